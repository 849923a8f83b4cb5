//! Inputs that must be a local file (a checkpoint, a FAISS index): an object is downloaded once
//! into the spool and reused while its ETag holds.
