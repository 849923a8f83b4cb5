//! Writing the overflow pages: values are appended to `data.mdb` from background threads in
//! page-aligned chunks, with `O_DIRECT` where the filesystem allows it.
//!
//! Apart from the writer because it is the only concurrent part of the bulk loader (threads,
//! channels, aligned buffers, a fallback when the filesystem refuses direct IO); the writer
//! only hands it bytes in file order and gets the file back at the end.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use crate::lmdb_file::page::PAGE;
use crate::storage;

/// Appends bytes to a file from threads of its own, in chunks (4 MiB by default), so writing
/// overlaps with producing the bytes (reading and checking the input): the job takes about as
/// long as the slower of the two, not the sum. At most [`CHUNKS`] chunks exist, so a slow disk
/// holds the producer back.
///
/// Where the filesystem allows it (Linux, not tmpfs), chunks are written with `O_DIRECT`: the
/// disk reads them straight from our buffer, with no copy into the page cache and no writeback
/// left for the final sync, which leaves the CPU to the reading side. Elsewhere they are
/// written through the page cache, with writeback started as they go.
pub(super) struct Appender {
    current: Chunk,
    /// File offset of `current`'s first byte.
    offset: u64,
    file: Option<Arc<File>>,
    full: Option<SyncSender<Chunk>>,
    empty: Receiver<Chunk>,
    /// Chunks made so far (made as needed, up to [`CHUNKS`]: small databases allocate little).
    made: usize,
    threads: Vec<JoinHandle<std::io::Result<()>>>,
}

/// Default chunk size.
pub(super) const CHUNK: usize = 4 << 20;
/// Chunks written at once: two requests in flight keep a fast disk busier than one.
const WRITERS: usize = 2;
pub(super) const CHUNKS: usize = WRITERS + 2;

/// Up to `size` bytes starting at a page-aligned address, as `O_DIRECT` needs, and the file
/// offset they go to. (Filled by appending, so the buffer is never zeroed first.)
struct Chunk {
    raw: Vec<u8>,
    start: usize,
    size: usize,
    offset: u64,
}

impl Chunk {
    fn new(size: usize) -> Self {
        let mut raw: Vec<u8> = Vec::with_capacity(size + PAGE);
        let start = raw.as_ptr().align_offset(PAGE).min(PAGE);
        raw.resize(start, 0);
        Chunk { raw, start, size, offset: 0 }
    }

    fn is_full(&self) -> bool {
        self.len() == self.size
    }

    fn len(&self) -> usize {
        self.raw.len() - self.start
    }

    fn bytes(&self) -> &[u8] {
        &self.raw[self.start..]
    }

    /// Copies in as much of `bytes` as fits; returns how much.
    fn fill(&mut self, bytes: &[u8]) -> usize {
        let n = (self.size - self.len()).min(bytes.len());
        self.raw.extend_from_slice(&bytes[..n]);
        n
    }

    fn clear(&mut self) {
        self.raw.truncate(self.start);
    }
}

/// The writing threads stopped (their results say why).
pub(super) struct Stopped;

/// Opens `path` again for direct writes, where the OS and filesystem support them.
fn open_direct(path: &Path) -> Option<File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        storage::open_with(path, File::options().write(true).custom_flags(libc::O_DIRECT)).ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        None
    }
}

/// Writes `chunk` at its offset: directly while `direct` is there, through the page cache
/// (starting its writeback) otherwise or once the filesystem refuses a direct write.
fn write_chunk(chunk: &Chunk, direct: &mut Option<File>, file: &File) -> std::io::Result<()> {
    let bytes = chunk.bytes();
    if let Some(out) = direct.as_ref().filter(|_| bytes.len().is_multiple_of(PAGE)) {
        match out.write_all_at(bytes, chunk.offset) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => *direct = None,
            Err(e) => return Err(e),
        }
    }
    file.write_all_at(bytes, chunk.offset)?;
    start_writeback(file, chunk.offset, chunk.offset + bytes.len() as u64);
    Ok(())
}

impl Appender {
    /// Appends to `file` (at `path`) from `offset` in chunks of `chunk` bytes (a multiple of
    /// [`PAGE`]); [`finish`](Self::finish) hands `file` back with its cursor at the end.
    /// `direct`: try `O_DIRECT` writes.
    pub(super) fn new(file: File, path: &Path, offset: u64, direct: bool, chunk: usize) -> Self {
        let file = Arc::new(file);
        let (full_tx, full_rx) = sync_channel::<Chunk>(CHUNKS);
        let (empty_tx, empty_rx) = sync_channel::<Chunk>(CHUNKS);
        let full_rx = Arc::new(std::sync::Mutex::new(full_rx));
        let threads = (0..WRITERS)
            .map(|_| {
                let (full_rx, empty_tx, file) = (full_rx.clone(), empty_tx.clone(), file.clone());
                let mut direct = if direct { open_direct(path) } else { None };
                std::thread::Builder::new()
                    .name("lmdb-writer".into())
                    .spawn(move || {
                        loop {
                            let next =
                                full_rx.lock().map_err(|_| std::io::Error::other("a writer thread panicked"))?.recv();
                            let Ok(mut chunk) = next else { return Ok(()) };
                            write_chunk(&chunk, &mut direct, &file)?;
                            chunk.clear();
                            let _ = empty_tx.send(chunk);
                        }
                    })
                    .expect("spawning an LMDB writer thread")
            })
            .collect();
        Appender {
            current: Chunk::new(chunk),
            offset,
            file: Some(file),
            full: Some(full_tx),
            empty: empty_rx,
            made: 1,
            threads,
        }
    }

    pub(super) fn append(&mut self, mut bytes: &[u8]) -> Result<(), Stopped> {
        while !bytes.is_empty() {
            let n = self.current.fill(bytes);
            bytes = &bytes[n..];
            if self.current.is_full() {
                self.send()?;
            }
        }
        Ok(())
    }

    fn send(&mut self) -> Result<(), Stopped> {
        let next = match self.empty.try_recv() {
            Ok(chunk) => chunk,
            Err(_) if self.made < CHUNKS => {
                self.made += 1;
                Chunk::new(self.current.size)
            }
            Err(_) => self.empty.recv().map_err(|_| Stopped)?,
        };
        let mut full = std::mem::replace(&mut self.current, next);
        full.offset = self.offset;
        self.offset += full.len() as u64;
        self.full.as_ref().expect("not finished").send(full).map_err(|_| Stopped)
    }

    /// Writes what is left and hands the file back (cursor at the end), or a thread's error.
    pub(super) fn finish(mut self) -> std::io::Result<File> {
        let sent = if self.current.len() == 0 { Ok(()) } else { self.send() };
        self.full = None;
        let mut result = Ok(());
        for thread in self.threads.drain(..) {
            let joined = thread.join().unwrap_or_else(|_| Err(std::io::Error::other("an LMDB writer thread panicked")));
            if result.is_ok() {
                result = joined;
            }
        }
        result?;
        if sent.is_err() {
            return Err(std::io::Error::other("the LMDB writer threads stopped early"));
        }
        let end = self.offset;
        let file = self.file.take().expect("finished once");
        let mut file = Arc::try_unwrap(file).map_err(|_| std::io::Error::other("the LMDB file is still shared"))?;
        file.seek(SeekFrom::Start(end))?;
        Ok(file)
    }
}

impl Drop for Appender {
    fn drop(&mut self) {
        self.full = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Asks the kernel to start writing back `from..to` (Linux), so the final sync has little left
/// to wait for and dirty pages stay few.
fn start_writeback(file: &File, from: u64, to: u64) {
    #[cfg(target_os = "linux")]
    if to > from {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall that takes no pointer, on `file`'s descriptor, open for the
        // whole call since `file` is borrowed; a failure only loses the hint.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                from as libc::off64_t,
                (to - from) as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, from, to);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failing write (here: a descriptor opened read-only) stops the writer threads and comes
    /// back as the error, from whichever call meets it first; nothing hangs. With `direct` the
    /// path cannot be opened for `O_DIRECT` (it does not exist), so that falls back as well.
    #[test]
    fn a_write_error_comes_back_without_hanging() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.mdb");
        std::fs::write(&path, b"").unwrap();
        for direct in [false, true] {
            let read_only = File::open(&path).unwrap();
            let mut appender = Appender::new(read_only, &dir.path().join("not-there"), 0, direct, 16 * PAGE);
            let page = vec![1u8; PAGE];
            let stopped = (0..(CHUNKS + 2) * 16).any(|_| appender.append(&page).is_err());
            let error = appender.finish().unwrap_err();
            assert!(stopped || error.raw_os_error() == Some(libc::EBADF), "{error}");
            assert_eq!(error.raw_os_error(), Some(libc::EBADF), "direct {direct}: {error}");
        }
    }
}
