//! Proxy integration tests.

mod hostile;
mod support;
