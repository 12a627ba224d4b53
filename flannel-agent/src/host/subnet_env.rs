//! TODO(helper): subnet_env
