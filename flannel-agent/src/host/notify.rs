//! TODO(helper): notify
