//! Proxy integration tests.

mod hostile;
mod recorder;
mod support;
