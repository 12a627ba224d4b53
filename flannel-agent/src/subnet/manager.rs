//! lease manager (TODO).
