//! Proxy integration tests.

mod hostile;
mod recorder;
mod shutdown;
mod support;
