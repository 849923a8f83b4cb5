//! A fault-injecting HTTP/1.1 reverse proxy for the object-store tests. It sits between our S3
//! client (`object_store`, with reqwest/hyper underneath) and a real S3 server (`s3s-fs`, see
//! [`crate::s3`]). On demand it answers `503 Slow Down`, goes silent, or stalls a download
//! part-way. A real object store fails in these ways under load, but `s3s-fs` cannot be made to.
//!
//! It forwards each request as the client sent it and changes only the `Connection` header. In
//! particular `Host` goes upstream byte-for-byte: the client signs the request for the proxy's
//! `host:port`, and the server checks that signature against the `Host` it receives.
//!
//! It uses std only. Each client connection gets its own thread, and each request gets a new
//! upstream connection. The proxy buffers each upstream response whole, then relays it with
//! `Content-Length` and `Connection: close` and closes the client's connection; hyper then opens
//! a new connection for its next request. The buffering means it suits test-sized objects only.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// The most bytes a request's or response's head (start line and headers) may take.
const HEAD_LIMIT: u64 = 1 << 20;

/// How long the proxy waits for the client to close once it has sent a complete response.
const LINGER: Duration = Duration::from_secs(2);

/// The body of the `503 Slow Down` that [`Fault::ServiceUnavailableEvery`] answers (S3's).
const SLOW_DOWN_BODY: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
     <Message>Please reduce your request rate.</Message><RequestId>faulty-proxy</RequestId></Error>";

/// What the proxy does to the requests it receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward every request.
    None,
    /// Answer every `n`th request with `503 Slow Down` and an S3 XML error body
    /// (`<Error><Code>SlowDown</Code>…`), and do not forward it. Requests are counted from the
    /// first one received after [`FaultyProxy::set`], so the faulted ones are `n`, `2n`, `3n`…
    /// Every other request is forwarded.
    ServiceUnavailableEvery(u64),
    /// Accept connections and read requests, but never answer them: hold the socket open and
    /// send nothing.
    Silent,
    /// Forward requests. For a `GET` whose response body is longer than `n` bytes, send the
    /// status line, the headers and only the first `n` bytes of the body, then hold the
    /// connection open and send nothing more. Other responses are relayed whole.
    StallBodyAfter(u64),
}

/// A fault-injecting reverse proxy on `127.0.0.1` in front of one upstream HTTP server. When it
/// is dropped it stops accepting, closes every connection it holds, and joins its threads.
pub struct FaultyProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

/// What the proxy's threads share.
struct Shared {
    /// The upstream's `host:port`.
    upstream: String,
    mode: Mutex<Mode>,
    requests: AtomicU64,
    faults: AtomicU64,
    sockets: Mutex<Sockets>,
}

/// The fault in force, and the number of requests received since it was set.
struct Mode {
    fault: Fault,
    seen: u64,
}

/// Every open socket (client and upstream) and every connection thread, for [`Drop`] to shut
/// down and join.
struct Sockets {
    stopped: bool,
    next_id: u64,
    open: HashMap<u64, TcpStream>,
    threads: Vec<JoinHandle<()>>,
}

/// What to do with one request.
enum Action {
    Forward,
    SlowDown,
    Silent,
    StallAfter(u64),
}

impl FaultyProxy {
    /// Starts a proxy on `127.0.0.1` at a free port, in front of `upstream`
    /// (`http://HOST:PORT`), forwarding every request ([`Fault::None`]).
    ///
    /// # Panics
    /// When `upstream` is not an `http://` URL, or no port can be bound.
    pub fn start(upstream: &str) -> FaultyProxy {
        let authority = upstream
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("the upstream {upstream:?} is not an http:// URL"))
            .trim_end_matches('/');
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port on 127.0.0.1");
        let addr = listener.local_addr().expect("a bound listener has an address");
        let shared = Arc::new(Shared {
            upstream: authority.to_string(),
            mode: Mutex::new(Mode { fault: Fault::None, seen: 0 }),
            requests: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            sockets: Mutex::new(Sockets { stopped: false, next_id: 0, open: HashMap::new(), threads: Vec::new() }),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || accept_loop(&listener, &shared))
        };
        FaultyProxy { addr, shared, acceptor: Some(acceptor) }
    }

    /// The proxy's endpoint, `http://127.0.0.1:PORT`, to give the client in place of the
    /// upstream's.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets the fault for the requests that arrive from now on (and restarts the count that
    /// [`Fault::ServiceUnavailableEvery`] uses).
    pub fn set(&self, fault: Fault) {
        *lock(&self.shared.mode) = Mode { fault, seen: 0 };
    }

    /// The number of requests received so far, faulted ones included.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// The number of requests answered with a fault so far: a `503` sent, a request left
    /// unanswered ([`Fault::Silent`]), or a response body stalled.
    pub fn faults(&self) -> u64 {
        self.shared.faults.load(Ordering::SeqCst)
    }
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        let threads = {
            let mut sockets = lock(&self.shared.sockets);
            sockets.stopped = true;
            for stream in sockets.open.values() {
                let _ = stream.shutdown(Shutdown::Both);
            }
            std::mem::take(&mut sockets.threads)
        };
        // Wake the accept loop, which then sees `stopped` and returns.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for thread in threads {
            let _ = thread.join();
        }
    }
}

/// Locks `mutex`, also when a panicking thread poisoned it (the state stays consistent).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A socket registered with [`Shared::track`]; dropping this unregisters it.
struct Tracked {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        lock(&self.shared.sockets).open.remove(&self.id);
    }
}

impl Shared {
    /// Registers `stream` for [`Drop`] to shut down, or returns `None` once the proxy has
    /// stopped. The caller holds the lock, so that [`Drop`] cannot miss the stream.
    fn track(self: &Arc<Self>, sockets: &mut Sockets, stream: &TcpStream) -> Option<Tracked> {
        if sockets.stopped {
            return None;
        }
        let clone = stream.try_clone().ok()?;
        let id = sockets.next_id;
        sockets.next_id += 1;
        sockets.open.insert(id, clone);
        Some(Tracked { shared: Arc::clone(self), id })
    }

    /// Counts a request that has arrived and decides what to do with it.
    fn action(&self) -> Action {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let mut mode = lock(&self.mode);
        mode.seen += 1;
        match mode.fault {
            Fault::None => Action::Forward,
            Fault::ServiceUnavailableEvery(n) if n > 0 && mode.seen.is_multiple_of(n) => Action::SlowDown,
            Fault::ServiceUnavailableEvery(_) => Action::Forward,
            Fault::Silent => Action::Silent,
            Fault::StallBodyAfter(n) => Action::StallAfter(n),
        }
    }

    fn fault(&self) {
        self.faults.fetch_add(1, Ordering::SeqCst);
    }
}

/// Accepts connections until the proxy stops, serving each on its own thread.
fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(_) => {
                // Out of file descriptors, say: wait rather than spin.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let mut sockets = lock(&shared.sockets);
        let Some(tracked) = shared.track(&mut sockets, &stream) else { return };
        sockets.threads.retain(|thread| !thread.is_finished());
        let thread_shared = Arc::clone(shared);
        sockets.threads.push(std::thread::spawn(move || {
            let _tracked = tracked;
            // A failed connection is the client's (or the test's) business; it just ends.
            let _ = serve(stream, &thread_shared);
        }));
    }
}

/// Serves one client connection: one request, then the connection is closed.
fn serve(client: TcpStream, shared: &Arc<Shared>) -> io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut writer = client;
    let request = match read_request(&mut reader, &mut writer) {
        Ok(Some(request)) => request,
        Ok(None) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            eprintln!("faulty proxy: a bad request: {e}");
            let reply = response("400 Bad Request", "text/plain", e.to_string().as_bytes());
            return finish(&mut writer, &mut reader, &reply);
        }
        Err(e) => return Err(e),
    };
    match shared.action() {
        Action::SlowDown => {
            shared.fault();
            finish(&mut writer, &mut reader, &response("503 Slow Down", "application/xml", SLOW_DOWN_BODY.as_bytes()))
        }
        Action::Silent => {
            shared.fault();
            hold(&mut reader)
        }
        action => {
            let relayed = match forward(&request, shared) {
                Ok(Some(relayed)) => relayed,
                Ok(None) => return Ok(()),
                Err(e) => {
                    let message = format!("faulty proxy: upstream {}: {e}", shared.upstream);
                    return finish(
                        &mut writer,
                        &mut reader,
                        &response("502 Bad Gateway", "text/plain", message.as_bytes()),
                    );
                }
            };
            let stall = match action {
                Action::StallAfter(n) if request.method == "GET" => {
                    usize::try_from(n).ok().filter(|&n| relayed.body.as_ref().is_some_and(|body| body.len() > n))
                }
                _ => None,
            };
            match (stall, &relayed.body) {
                (Some(n), Some(body)) => {
                    shared.fault();
                    writer.write_all(&relayed.head)?;
                    writer.write_all(&body[..n])?;
                    writer.flush()?;
                    hold(&mut reader)
                }
                _ => {
                    let mut reply = relayed.head;
                    reply.extend_from_slice(relayed.body.as_deref().unwrap_or_default());
                    finish(&mut writer, &mut reader, &reply)
                }
            }
        }
    }
}

/// A request read from the client.
struct Request {
    method: String,
    /// The head to send upstream: the client's, with `Connection: close` in place of its own
    /// `Connection` header.
    head: Vec<u8>,
    /// The body exactly as the client framed it (chunked bodies stay chunked).
    body: Vec<u8>,
}

/// Reads one request, or `None` when the client closed the connection before sending one.
/// Answers `Expect: 100-continue` itself.
fn read_request(reader: &mut impl BufRead, writer: &mut impl Write) -> io::Result<Option<Request>> {
    let Some(lines) = read_head(reader)? else { return Ok(None) };
    let method = String::from_utf8_lossy(lines[0].split(|&b| b == b' ').next().unwrap_or_default()).into_owned();
    let mut head = lines[0].clone();
    let (mut content_length, mut chunked, mut expect_continue) = (None, false, false);
    for line in &lines[1..] {
        let (name, value) = header(line)?;
        match name.as_str() {
            "connection" => continue,
            "content-length" => content_length = Some(parse_length(&value)?),
            "transfer-encoding" => chunked = is_chunked(&value),
            "expect" => expect_continue = value.eq_ignore_ascii_case("100-continue"),
            _ => {}
        }
        head.extend_from_slice(line);
    }
    head.extend_from_slice(b"Connection: close\r\n\r\n");
    if expect_continue {
        writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        writer.flush()?;
    }
    let body = if chunked { read_chunked(reader)?.0 } else { read_exactly(reader, content_length.unwrap_or(0))? };
    Ok(Some(Request { method, head, body }))
}

/// An upstream response, ready to relay to the client.
struct Relayed {
    /// The status line and headers, ending with `Connection: close` and the blank line.
    head: Vec<u8>,
    /// The (de-chunked) body; `None` for a response that has none (to `HEAD`, a `204`, a `304`).
    body: Option<Vec<u8>>,
}

/// Sends `request` upstream on a new connection and reads the whole response; `None` when the
/// proxy stopped meanwhile.
fn forward(request: &Request, shared: &Arc<Shared>) -> io::Result<Option<Relayed>> {
    let addr = shared.upstream.as_str();
    let upstream = std::net::ToSocketAddrs::to_socket_addrs(addr)?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{addr} resolves to nothing")))?;
    let stream = TcpStream::connect_timeout(&upstream, Duration::from_secs(5))?;
    let Some(_tracked) = shared.track(&mut lock(&shared.sockets), &stream) else { return Ok(None) };
    (&stream).write_all(&request.head)?;
    (&stream).write_all(&request.body)?;
    (&stream).flush()?;
    let mut reader = BufReader::new(&stream);
    // Skip interim responses (a `100 Continue` to the client's `Expect`).
    let lines = loop {
        let lines = read_head(&mut reader)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "closed without a response"))?;
        let status = lines[0].split(|&b| b == b' ').nth(1).unwrap_or_default();
        if !status.starts_with(b"1") || status == b"101" {
            break lines;
        }
    };
    let status = lines[0].split(|&b| b == b' ').nth(1).unwrap_or_default().to_vec();
    let bodyless = request.method == "HEAD" || status.starts_with(b"1") || status == b"204" || status == b"304";
    let (mut content_length, mut chunked) = (None, false);
    let mut head = lines[0].clone();
    for line in &lines[1..] {
        let (name, value) = header(line)?;
        match name.as_str() {
            "connection" | "keep-alive" => continue,
            "content-length" => content_length = Some(parse_length(&value)?),
            "transfer-encoding" => chunked = is_chunked(&value),
            _ => {}
        }
        // A relayed body is re-framed with a Content-Length of its own.
        if !bodyless && matches!(name.as_str(), "content-length" | "transfer-encoding") {
            continue;
        }
        head.extend_from_slice(line);
    }
    let body = if bodyless {
        None
    } else if chunked {
        Some(read_chunked(&mut reader)?.1)
    } else if let Some(length) = content_length {
        Some(read_exactly(&mut reader, length)?)
    } else {
        let mut body = Vec::new();
        reader.read_to_end(&mut body)?;
        Some(body)
    };
    if let Some(body) = &body {
        head.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    head.extend_from_slice(b"Connection: close\r\n\r\n");
    Ok(Some(Relayed { head, body }))
}

/// Reads a message head: the start line and the header lines, each with its line ending, up
/// to the blank line (not returned). `None` when the peer closed before sending anything.
fn read_head(reader: &mut impl BufRead) -> io::Result<Option<Vec<Vec<u8>>>> {
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut size = 0;
    loop {
        let mut line = Vec::new();
        size += reader.take(HEAD_LIMIT + 1 - size).read_until(b'\n', &mut line)? as u64;
        if line.is_empty() && lines.is_empty() {
            return Ok(None);
        }
        if size > HEAD_LIMIT {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "message head over 1 MiB"));
        }
        if !line.ends_with(b"\n") {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside a message head"));
        }
        let blank = line == b"\r\n" || line == b"\n";
        match (blank, lines.is_empty()) {
            (true, true) => continue, // Blank lines before the start line are allowed.
            (true, false) => return Ok(Some(lines)),
            (false, _) => lines.push(line),
        }
    }
}

/// Splits a header line into its lower-cased name and its trimmed value.
fn header(line: &[u8]) -> io::Result<(String, String)> {
    let text = String::from_utf8_lossy(line);
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("not a header line: {text:?}")))?;
    Ok((name.trim().to_ascii_lowercase(), value.trim().to_string()))
}

fn parse_length(value: &str) -> io::Result<u64> {
    value.parse().map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad Content-Length {value:?}")))
}

fn is_chunked(transfer_encoding: &str) -> bool {
    transfer_encoding.rsplit(',').next().is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
}

fn read_exactly(reader: &mut impl Read, length: u64) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    reader.take(length).read_to_end(&mut body)?;
    if (body.len() as u64) < length {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside a body"));
    }
    Ok(body)
}

/// Reads a chunked body through its trailers; returns it as sent (framing included) and
/// decoded.
fn read_chunked(reader: &mut impl BufRead) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let (mut raw, mut decoded) = (Vec::new(), Vec::new());
    loop {
        let mut line = Vec::new();
        reader.take(HEAD_LIMIT).read_until(b'\n', &mut line)?;
        if !line.ends_with(b"\n") {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside a chunked body"));
        }
        raw.extend_from_slice(&line);
        let text = String::from_utf8_lossy(&line);
        let size = text.split(';').next().unwrap_or_default().trim();
        let size = u64::from_str_radix(size, 16)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad chunk size line {text:?}")))?;
        if size == 0 {
            break;
        }
        let chunk = read_exactly(reader, size + 2)?; // The data and its CRLF.
        raw.extend_from_slice(&chunk);
        decoded.extend_from_slice(&chunk[..chunk.len() - 2]);
    }
    // Trailers, up to the blank line.
    loop {
        let mut line = Vec::new();
        reader.take(HEAD_LIMIT).read_until(b'\n', &mut line)?;
        if !line.ends_with(b"\n") {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside chunk trailers"));
        }
        raw.extend_from_slice(&line);
        if line == b"\r\n" || line == b"\n" {
            return Ok((raw, decoded));
        }
    }
}

/// A complete response the proxy makes itself (with `Connection: close`).
fn response(status: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    reply.extend_from_slice(body);
    reply
}

/// Sends `reply`, then closes the connection gracefully: half-close, and wait (a while) for
/// the client to close its side, so that it reads the whole reply rather than a reset.
fn finish(writer: &mut TcpStream, reader: &mut impl Read, reply: &[u8]) -> io::Result<()> {
    writer.write_all(reply)?;
    writer.flush()?;
    writer.shutdown(Shutdown::Write)?;
    writer.set_read_timeout(Some(LINGER))?;
    let _ = io::copy(reader, &mut io::sink());
    Ok(())
}

/// Holds the connection open, sending nothing, until the client closes it or the proxy stops.
fn hold(reader: &mut impl Read) -> io::Result<()> {
    io::copy(reader, &mut io::sink()).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Instant;

    /// What the test upstream received: one request's head and body.
    type Received = (String, Vec<u8>);

    /// A tiny upstream: answers every request with `200 OK` and the body `hello world` (headers
    /// only to a `HEAD`), and sends each request it gets down the returned channel.
    fn upstream() -> (String, mpsc::Receiver<Received>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut received = Vec::new();
                let mut byte = [0];
                while !received.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap() == 1 {
                    received.push(byte[0]);
                }
                let head = String::from_utf8(received).unwrap();
                let lower = head.to_ascii_lowercase();
                let mut body = Vec::new();
                if lower.contains("transfer-encoding: chunked") {
                    while !body.ends_with(b"0\r\n\r\n") && stream.read(&mut byte).unwrap() == 1 {
                        body.push(byte[0]);
                    }
                } else if let Some(rest) = lower.split("content-length:").nth(1) {
                    let length: u64 = rest.lines().next().unwrap().trim().parse().unwrap();
                    (&mut stream).take(length).read_to_end(&mut body).unwrap();
                }
                let reply = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\
                             Connection: close\r\n\r\n";
                let body_out = if head.starts_with("HEAD ") { "" } else { "hello world" };
                sender.send((head, body)).unwrap();
                stream.write_all(format!("{reply}{body_out}").as_bytes()).unwrap();
            }
        });
        (endpoint, receiver)
    }

    /// Connects to `proxy`, with a 1 s read timeout, and sends `request`.
    fn send(proxy: &FaultyProxy, request: &str) -> TcpStream {
        let mut stream = TcpStream::connect(proxy.addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        stream
    }

    /// Reads until the proxy closes the connection (`Ok`) or the read fails or times out
    /// (`Err`, with what had arrived).
    fn read_reply(stream: &mut TcpStream) -> Result<String, (String, io::Error)> {
        let mut received = Vec::new();
        let mut buf = [0; 4096];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return Ok(String::from_utf8(received).unwrap()),
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(e) => return Err((String::from_utf8(received).unwrap(), e)),
            }
        }
    }

    fn timed_out(e: &io::Error) -> bool {
        matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
    }

    const GET: &str = "GET /b/k HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n";

    #[test]
    fn forwards_requests_unchanged_but_for_connection() {
        let (upstream, received) = upstream();
        let proxy = FaultyProxy::start(&upstream);

        let request = "PUT /b/k?x-id=1 HTTP/1.1\r\nHost: Example.test:1234\r\nx-amz-date: 20240101T000000Z\r\n\
                       connection: keep-alive\r\nContent-Length: 5\r\n\r\nabcde";
        let reply = read_reply(&mut send(&proxy, request)).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(reply.contains("\r\nConnection: close\r\n"), "{reply}");
        assert!(reply.ends_with("\r\n\r\nhello world"), "{reply}");
        let (head, body) = received.recv().unwrap();
        assert_eq!(
            head,
            "PUT /b/k?x-id=1 HTTP/1.1\r\nHost: Example.test:1234\r\nx-amz-date: 20240101T000000Z\r\n\
             Content-Length: 5\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(body, b"abcde");

        // A chunked body goes upstream as it came.
        let chunked = "3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n";
        let request = format!("POST /b/k HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}");
        let reply = read_reply(&mut send(&proxy, &request)).unwrap();
        assert!(reply.ends_with("\r\n\r\nhello world"), "{reply}");
        assert_eq!(received.recv().unwrap().1, chunked.as_bytes());

        // The response to a HEAD has a Content-Length but no body: it is not waited for.
        let reply = read_reply(&mut send(&proxy, "HEAD /b/k HTTP/1.1\r\nHost: h\r\n\r\n")).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(reply.contains("\r\nContent-Length: 11\r\n"), "{reply}");
        assert!(reply.ends_with("\r\n\r\n"), "{reply}");
        assert!(received.recv().unwrap().0.starts_with("HEAD /b/k HTTP/1.1\r\n"));

        assert_eq!((proxy.requests(), proxy.faults()), (3, 0));
    }

    #[test]
    fn service_unavailable_every_second_request() {
        let (upstream, received) = upstream();
        let proxy = FaultyProxy::start(&upstream);
        proxy.set(Fault::ServiceUnavailableEvery(2));
        let replies: Vec<String> = (0..3).map(|_| read_reply(&mut send(&proxy, GET)).unwrap()).collect();
        assert!(replies[0].ends_with("hello world"), "{}", replies[0]);
        assert!(replies[1].starts_with("HTTP/1.1 503 Slow Down\r\n"), "{}", replies[1]);
        assert!(replies[1].contains("<Code>SlowDown</Code>"), "{}", replies[1]);
        assert!(replies[2].ends_with("hello world"), "{}", replies[2]);
        // Only the first and third reached the upstream.
        assert_eq!(received.try_iter().count(), 2);
        assert_eq!((proxy.requests(), proxy.faults()), (3, 1));
    }

    #[test]
    fn silent_never_answers() {
        let (upstream, received) = upstream();
        let proxy = FaultyProxy::start(&upstream);
        proxy.set(Fault::Silent);
        let (got, error) = read_reply(&mut send(&proxy, GET)).unwrap_err();
        assert!(timed_out(&error), "{error}");
        assert_eq!(got, "");
        assert_eq!(received.try_iter().count(), 0);
        assert_eq!((proxy.requests(), proxy.faults()), (1, 1));
    }

    #[test]
    fn stall_body_after_three_bytes() {
        let (upstream, _received) = upstream();
        let proxy = FaultyProxy::start(&upstream);
        proxy.set(Fault::StallBodyAfter(3));
        let (got, error) = read_reply(&mut send(&proxy, GET)).unwrap_err();
        assert!(timed_out(&error), "{error}");
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        assert!(got.contains("\r\nContent-Length: 11\r\n"), "{got}");
        assert!(got.ends_with("\r\n\r\nhel"), "{got}");
        assert_eq!((proxy.requests(), proxy.faults()), (1, 1));
    }

    #[test]
    fn drop_closes_held_connections_promptly() {
        let (upstream, _received) = upstream();
        let proxy = FaultyProxy::start(&upstream);
        proxy.set(Fault::Silent);
        let mut held = send(&proxy, GET);
        held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let started = Instant::now();
        while proxy.requests() == 0 {
            assert!(started.elapsed() < Duration::from_secs(5), "the request never arrived");
            std::thread::sleep(Duration::from_millis(5));
        }
        let started = Instant::now();
        drop(proxy);
        assert!(started.elapsed() < Duration::from_secs(2), "drop took {:?}", started.elapsed());
        // The held connection was closed, not left hanging.
        match read_reply(&mut held) {
            Ok(got) => assert_eq!(got, ""),
            Err((_, e)) => assert!(!timed_out(&e), "the held connection is still open"),
        }
    }
}
