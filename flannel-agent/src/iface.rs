//! External interface selection.
