//! Integration with the host around the overlay: the files and rules other software reads.

pub mod docker_opts;
pub mod health;
pub mod notify;
pub mod status;
pub mod subnet_env;
pub mod trafficmngr;
