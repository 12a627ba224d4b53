//! flanneld command line.
