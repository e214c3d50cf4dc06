//! Integration tests live in `tests/`; this library holds nothing.
