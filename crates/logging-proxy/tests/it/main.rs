//! Proxy integration tests.

mod hostile;
mod recorder;
mod shutdown;
mod slow_reader;
mod support;
mod upstream;
