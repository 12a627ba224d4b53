//! Test fixtures: a real etcd, network namespaces, child processes; all cleaned up on drop.
