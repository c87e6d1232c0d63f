//! pskv-kvstore (to be built by its own issue).
