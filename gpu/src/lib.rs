//! pskv-gpu (to be built by its own issue).
