//! FAISS factory strings checked before FAISS sees them. FAISS trusts the sizes in a factory
//! string: `IVF0,Flat` segfaults in the index factory, `IVF0,PQ8np` aborts, and an absurd size
//! asks for terabytes; none of these come back as an error a job could report. Every size in
//! the string (the digits of `IVF4096`, `PQ64`, `HNSW32`, `OPQ16_64`, …) must therefore be a
//! number from 1 to [`MAX_SIZE`]; what is left (an unknown component, `PQ` not dividing the
//! dimension) FAISS reports itself, as an error.

use super::error::{Error, Result};

/// The largest size a factory string may name (2²⁶: 67M lists is past any IVF in use; the
/// 1B-vector indexes use 65,536 to 1M).
pub const MAX_SIZE: u64 = 1 << 26;

/// Checks the sizes in `description`.
///
/// # Errors
/// [`Error::FactorySize`] naming the component whose size is 0 or too large;
/// [`Error::EmptyFactory`].
pub fn check(description: &str) -> Result<()> {
    if description.trim().is_empty() {
        return Err(Error::EmptyFactory);
    }
    for component in description.split(',') {
        let bytes = component.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if !bytes[i].is_ascii_digit() {
                i += 1;
                continue;
            }
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            let size = component[start..i].parse::<u64>().unwrap_or(u64::MAX);
            if size == 0 || size > MAX_SIZE {
                return Err(Error::FactorySize {
                    description: description.to_string(),
                    component: component.trim().to_string(),
                    size: component[start..i].to_string(),
                });
            }
        }
    }
    Ok(())
}

/// FAISS's C++ exception text in its own words, without the C++ signature and source location
/// it wraps them in (`Error in void faiss::Clustering::train_encoded(…) at …/Clustering.cpp:275:
/// Error: 'nx >= k' failed: Number of training points (60) should be at least as large as number
/// of clusters (1024)` → `Number of training points (60) …`).
pub fn words(error: &impl std::fmt::Display) -> String {
    let text = error.to_string();
    let reason = match (text.rfind("' failed: "), text.rfind("Error: ")) {
        (Some(at), _) => &text[at + "' failed: ".len()..],
        (None, Some(at)) => &text[at + "Error: ".len()..],
        (None, None) => &text,
    };
    reason.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::{check, words};

    #[test]
    fn faiss_messages_lose_their_cpp_wrapping() {
        let raw = "Error in void faiss::Clustering::train_encoded(idx_t, const uint8_t*, const Index*, Index&, \
                   const float*) at /faiss/faiss/Clustering.cpp:275: Error: 'nx >= k' failed: Number of training \
                   points (60) should be at least as large as number of clusters (1024)";
        assert_eq!(
            words(&raw),
            "Number of training points (60) should be at least as large as number of clusters (1024)"
        );
        assert_eq!(
            words(&"Error in f at x.cpp:1: Error: could not open a.index for reading"),
            "could not open a.index for reading"
        );
        assert_eq!(words(&"plain"), "plain");
    }

    #[test]
    fn zero_and_absurd_sizes_are_refused_before_faiss() {
        for good in
            ["Flat", "IVF1024,Flat", "IVF4096_HNSW32,PQ64np,RFlat", "HNSW32", "IVF256,SQ8", "OPQ16_64,IVF1,PQ16"]
        {
            assert!(check(good).is_ok(), "{good}");
        }
        for (bad, named) in [
            ("IVF0,Flat", "IVF0"),
            ("IVF0,PQ8np", "IVF0"),
            ("IVF16,PQ0", "PQ0"),
            ("HNSW0", "HNSW0"),
            ("IVF99999999999999999999999,Flat", "IVF99999999999999999999999"),
            ("IVF134217728,Flat", "IVF134217728"),
        ] {
            let said = check(bad).unwrap_err().to_string();
            assert!(said.contains(named), "{bad}: {said}");
        }
        assert!(check(" ").is_err());
    }
}
