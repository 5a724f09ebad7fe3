//! vGIC tests: register semantics of the distributor and redistributors, list-register flush and
//! sync against a model of the virtual CPU interface, SGIs, isolation, concurrency.

mod concurrency;
mod dist;
mod isolation;
mod lr;
mod redist;
mod sgi;
