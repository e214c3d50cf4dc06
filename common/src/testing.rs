//! Test fixtures shared by the unit tests of the server crate and the integration tests in
//! `tests/`: not part of the API, hidden from the docs.

pub mod ports;
pub mod postgres;
