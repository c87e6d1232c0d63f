//! pskv-transport (to be built by its own issue).
