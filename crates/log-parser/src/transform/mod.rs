//! Pure, synchronous transforms on owned data: SSE parsing, stitching, usage, consolidation.

pub mod consolidate;
pub mod responses;
pub mod sse;
pub mod stitch;
pub mod usage;
