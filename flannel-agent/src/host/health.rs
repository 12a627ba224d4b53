//! TODO(helper): health
