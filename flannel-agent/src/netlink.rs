//! The only rtnetlink importer.
