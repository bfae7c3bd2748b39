//! Cross-crate integration tests: simulator + proxy + parser + store in-process on port 0,
//! the OTLP export into an in-process receiver, and the `tollgate` binary driven by the real
//! `openai` Python SDK.
#![expect(
    clippy::disallowed_methods,
    reason = "tests spawn their servers directly"
)]
#![expect(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test helpers fail loudly"
)]

mod consumers;
mod cosmos_faults;
mod e2e;
mod entra;
mod entra_callers;
mod harness;
mod hostile;
mod kill;
mod limits;
mod limits_redis;
mod otlp;
mod pipeline;
mod pools;
mod readonly;
mod registry;
mod reload;
mod scale;
mod up;
