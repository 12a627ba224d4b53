//! TODO(helper): docker_opts
