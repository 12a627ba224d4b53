//! etcd registry (TODO).
