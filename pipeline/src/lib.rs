//! The streaming DAG runtime that every cnclip job runs on.
//!
//! Sources, operators and sinks are nodes joined by bounded edges (bounded by rows *and* bytes,
//! since batches vary), so a slow stage pushes back on everything upstream and memory stays
//! flat on billion-row corpora. A running graph owns all of its tasks: dropping it, or the first
//! fatal error, cancels them all. CPU-heavy work runs on a worker pool, never on the reactor.
//!
//! This crate knows nothing about tensors or indexes — it builds without libtorch and FAISS.
