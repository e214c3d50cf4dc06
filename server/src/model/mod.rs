//! Domain types shared by the services and the datastore (a leaf: it imports no service
//! module, so `datastore` and `engines` both use it without importing each other).

pub mod engine;
