//! Object stores: `s3://` (AWS S3 and the S3-compatible stores: MinIO, Aliyun OSS, Cloudflare
//! R2, Ceph…), `gs://`, `az://` / `abfs://`, and `https://` (read-only), through the
//! [`object_store`] crate. This module turns a location into a store and a key, configures the
//! stores, and runs their requests; [`super`] decides per call whether a location is local or
//! remote.
//!
//! **Configuration.** A store is built from the environment its SDKs read (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL` for an
//! S3-compatible store; `GOOGLE_*`; `AZURE_*`), then AWS's shared profile files for what the
//! environment leaves unset (`~/.aws/credentials` and `~/.aws/config`, section
//! `AWS_PROFILE` or `default`), then the job's `--storage-option KEY=VALUE` flags
//! ([`configure`]), which win. Keys are `object_store`'s (`endpoint`, `region`,
//! `access_key_id`, `timeout`, `connect_timeout`, `allow_http`, …) plus two of ours: `retries`
//! (attempts after the first, default 10) and `retry_timeout` (how long one request may keep
//! retrying, default 3 min). An `http://` endpoint is allowed without TLS: the user named it.
//!
//! **Requests** run on a small tokio runtime of their own ([`run`]), so a source thread, a sink
//! thread or a task of the pipeline's runtime can wait on one. Transient failures (timeouts, a
//! connection refused or cut, 5xx, 429 SlowDown) are retried by the store with exponential
//! backoff; each failed attempt is counted ([`Counters`]) for the job report. A request that
//! still fails names the object, the attempts made and the last error.

use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use object_store::client::{
    ClientOptions, HttpClient, HttpConnector, HttpError, HttpRequest, HttpResponse, HttpService, ReqwestConnector,
};
use object_store::multipart::MultipartStore;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, RetryConfig};

/// A store: its object interface and, where it has one, its multipart interface (which names
/// uploads, so one left behind by a killed job can be aborted later: [`Remote::upload`]).
#[derive(Clone)]
pub struct Store {
    pub objects: Arc<dyn ObjectStore>,
    multipart: Option<Arc<dyn MultipartStore>>,
    /// Which store this is: the bucket's root URL and, for S3, its endpoint (one bucket name
    /// may exist on several S3-compatible servers).
    place: String,
}

/// An object in a store: where requests go, and the URL it was given as (for messages).
#[derive(Clone)]
pub struct Remote {
    pub store: Arc<dyn ObjectStore>,
    multipart: Option<Arc<dyn MultipartStore>>,
    place: String,
    pub key: ObjectPath,
    pub url: String,
    /// Whether the store can be written (`https://` cannot).
    pub writable: bool,
}

impl Remote {
    /// Which object this is, wherever its URL may also name another: the store (for S3, with its
    /// endpoint: a bucket name may exist on several servers) and the key.
    pub fn identity(&self) -> String {
        format!("{} {}", self.place, self.key)
    }
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

/// An object store's failure, naming the object.
#[derive(Debug, thiserror::Error)]
#[error("{url}: {source}")]
pub struct RemoteError {
    pub url: String,
    #[source]
    pub source: object_store::Error,
}

impl RemoteError {
    /// As an `io::Error` of the matching kind (`NotFound`, `AlreadyExists` for a lost
    /// conditional write, `PermissionDenied`, else `Other`), keeping this error as its source.
    pub fn into_io(url: &str, source: object_store::Error) -> io::Error {
        use object_store::Error as E;
        let kind = match &source {
            E::NotFound { .. } => io::ErrorKind::NotFound,
            E::AlreadyExists { .. } | E::Precondition { .. } => io::ErrorKind::AlreadyExists,
            E::PermissionDenied { .. } | E::Unauthenticated { .. } => io::ErrorKind::PermissionDenied,
            E::NotSupported { .. } | E::NotImplemented { .. } => io::ErrorKind::Unsupported,
            E::InvalidPath { .. } => io::ErrorKind::InvalidInput,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, RemoteError { url: url.to_string(), source })
    }
}

/// Whether `text` is a URL of a remote scheme this module serves.
pub fn is_remote_scheme(scheme: &str) -> bool {
    matches!(
        scheme.to_ascii_lowercase().as_str(),
        "s3" | "s3a" | "gs" | "az" | "adl" | "azure" | "abfs" | "abfss" | "http" | "https"
    )
}

/// The store and key of a remote URL.
///
/// # Errors
/// `InvalidInput` for a URL that does not parse or names no bucket; the store's
/// configuration error (an unknown `--storage-option`, a malformed endpoint).
pub fn parse(text: &str) -> io::Result<Remote> {
    let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, format!("{text}: {why}"));
    let url = url::Url::parse(text).map_err(|e| invalid(format!("not a valid URL ({e})")))?;
    let scheme = url.scheme().to_ascii_lowercase();
    let http = scheme == "http" || scheme == "https";
    // One store per scheme and bucket (or host): its connections are shared by every object.
    let root = if http {
        url[..url::Position::BeforePath].to_string()
    } else {
        let bucket = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| invalid("names no bucket".into()))?;
        format!("{scheme}://{bucket}")
    };
    let key_text = url.path().trim_start_matches('/');
    let key = ObjectPath::from_url_path(key_text).map_err(|e| invalid(format!("not a valid object key ({e})")))?;
    let Store { objects, multipart, place } = store(&scheme, &root)?;
    Ok(Remote { store: objects, multipart, place, key, url: text.trim_end_matches('/').to_string(), writable: !http })
}

/// The stores built so far, by scheme and bucket.
static STORES: LazyLock<Mutex<HashMap<String, Store>>> = LazyLock::new(Default::default);

fn store(scheme: &str, root: &str) -> io::Result<Store> {
    let mut stores = STORES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(store) = stores.get(root) {
        return Ok(store.clone());
    }
    let built = build(scheme, root).map_err(|e| match e {
        BuildError::Option(message) => io::Error::new(io::ErrorKind::InvalidInput, message),
        BuildError::Store(source) => RemoteError::into_io(root, source),
    })?;
    stores.insert(root.to_string(), built.clone());
    Ok(built)
}

enum BuildError {
    Option(String),
    Store(object_store::Error),
}

impl From<object_store::Error> for BuildError {
    fn from(e: object_store::Error) -> Self {
        BuildError::Store(e)
    }
}

/// The options given with `--storage-option`, set once per process by the CLI.
static OPTIONS: OnceLock<Vec<(String, String)>> = OnceLock::new();

/// Sets the `--storage-option KEY=VALUE` pairs every store of this process is built with
/// (later ones win). Called once, before the job opens anything; a second call is ignored.
pub fn configure(options: Vec<(String, String)>) {
    let _ = OPTIONS.set(options);
}

/// The options this process was configured with.
fn options() -> &'static [(String, String)] {
    OPTIONS.get().map_or(&[], Vec::as_slice)
}

/// Our own keys among the options, and the store's.
struct Settings {
    retry: RetryConfig,
    store: Vec<(String, String)>,
}

fn settings() -> Result<Settings, BuildError> {
    let mut retry = RetryConfig::default();
    let mut store = Vec::new();
    for (key, value) in options() {
        let bad = |why: &str| BuildError::Option(format!("--storage-option {key}={value}: {why}"));
        match key.to_ascii_lowercase().as_str() {
            "retries" => retry.max_retries = value.parse().map_err(|_| bad("not a whole number"))?,
            "retry_timeout" => {
                retry.retry_timeout = parse_duration(value).ok_or_else(|| bad("not a duration (30s, 2min, 500ms)"))?
            }
            _ => store.push((key.to_ascii_lowercase(), value.clone())),
        }
    }
    Ok(Settings { retry, store })
}

/// `30s`, `500ms`, `2min`, `1h` or a number of seconds.
fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let seconds = match unit.trim() {
        "" | "s" | "sec" | "secs" => number,
        "ms" => number / 1000.0,
        "m" | "min" | "mins" => number * 60.0,
        "h" => number * 3600.0,
        _ => return None,
    };
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds))
}

/// Both interfaces of a store that has multipart uploads.
fn with_multipart<S: ObjectStore + MultipartStore>(store: S, place: String) -> Store {
    let store = Arc::new(store);
    Store { objects: store.clone(), multipart: Some(store), place }
}

fn build(scheme: &str, root: &str) -> Result<Store, BuildError> {
    let Settings { retry, store: options } = settings()?;
    let unknown =
        |key: &str| BuildError::Option(format!("--storage-option {key}: not an option of {scheme}:// stores"));
    let connector = Counting(ReqwestConnector::default());
    Ok(match scheme {
        "s3" | "s3a" => {
            use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
            let mut builder = AmazonS3Builder::from_env().with_url(root);
            for (key, value) in aws_profile() {
                let key: AmazonS3ConfigKey = key.parse()?;
                if builder.get_config_value(&key).is_none() {
                    builder = builder.with_config(key, value);
                }
            }
            for (key, value) in &options {
                builder = builder.with_config(key.parse().map_err(|_| unknown(key))?, value);
            }
            // An `http://` endpoint (a MinIO in the same cluster) is the user's own choice.
            let endpoint = [AmazonS3ConfigKey::S3Endpoint, AmazonS3ConfigKey::Endpoint]
                .iter()
                .find_map(|key| builder.get_config_value(key));
            if endpoint.as_deref().is_some_and(|e| e.starts_with("http://")) {
                builder = builder.with_allow_http(true);
            }
            if builder.get_config_value(&AmazonS3ConfigKey::Region).is_none() {
                builder = builder.with_region("us-east-1");
            }
            let place = format!("{root} at {}", endpoint.as_deref().unwrap_or("AWS"));
            with_multipart(builder.with_retry(retry).with_http_connector(connector).build()?, place)
        }
        "gs" => {
            let mut builder = object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(root);
            for (key, value) in &options {
                builder = builder.with_config(key.parse().map_err(|_| unknown(key))?, value);
            }
            with_multipart(builder.with_retry(retry).with_http_connector(connector).build()?, root.to_string())
        }
        "az" | "adl" | "azure" | "abfs" | "abfss" => {
            let mut builder = object_store::azure::MicrosoftAzureBuilder::from_env().with_url(root);
            for (key, value) in &options {
                builder = builder.with_config(key.parse().map_err(|_| unknown(key))?, value);
            }
            with_multipart(builder.with_retry(retry).with_http_connector(connector).build()?, root.to_string())
        }
        _ => {
            let mut builder = object_store::http::HttpBuilder::new().with_url(root);
            for (key, value) in &options {
                builder = builder.with_config(key.parse().map_err(|_| unknown(key))?, value);
            }
            let http = Arc::new(builder.with_retry(retry).with_http_connector(connector).build()?);
            Store { objects: http, multipart: None, place: root.to_string() }
        }
    })
}

/// What AWS's shared files say for the profile `AWS_PROFILE` (or `default`): credentials from
/// `AWS_SHARED_CREDENTIALS_FILE` (`~/.aws/credentials`), region and endpoint from
/// `AWS_CONFIG_FILE` (`~/.aws/config`, where a profile's section is `[profile NAME]`). As
/// `object_store` keys; files that are missing give nothing.
fn aws_profile() -> Vec<(&'static str, String)> {
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    let file = |variable: &str, default: &str| {
        std::env::var_os(variable).map(std::path::PathBuf::from).or_else(|| home.as_ref().map(|h| h.join(default)))
    };
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let mut found = Vec::new();
    let wanted = [
        ("aws_access_key_id", "aws_access_key_id"),
        ("aws_secret_access_key", "aws_secret_access_key"),
        ("aws_session_token", "aws_session_token"),
        ("region", "aws_region"),
        ("endpoint_url", "aws_endpoint"),
    ];
    let sections = [
        (file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials"), profile.clone()),
        (
            file("AWS_CONFIG_FILE", ".aws/config"),
            if profile == "default" { profile.clone() } else { format!("profile {profile}") },
        ),
    ];
    for (path, section) in sections {
        let Some(text) = path.and_then(|p| std::fs::read_to_string(p).ok()) else { continue };
        for (name, value) in ini_section(&text, &section) {
            if let Some((_, key)) = wanted.iter().find(|(n, _)| *n == name)
                && !found.iter().any(|(k, _)| k == key)
            {
                found.push((*key, value));
            }
        }
    }
    found
}

/// The `name = value` lines of `[section]` in an INI text.
fn ini_section(text: &str, section: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') && line.ends_with(']') {
            inside = line[1..line.len() - 1].trim() == section;
        } else if inside
            && !line.starts_with(['#', ';'])
            && let Some((name, value)) = line.split_once('=')
        {
            out.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    out
}

/// Requests made and failed attempts, over every store of this process.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    /// Attempts that failed with a timeout, a connection error, 5xx or 429: the store retried
    /// them (or gave up, and the job fails).
    pub failed_attempts: AtomicU64,
}

/// This process's counters.
pub static COUNTERS: Counters = Counters { requests: AtomicU64::new(0), failed_attempts: AtomicU64::new(0) };

/// The HTTP client every store uses: reqwest's, counting what it does.
#[derive(Debug)]
struct Counting(ReqwestConnector);

impl HttpConnector for Counting {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(CountingService(self.0.connect(options)?)))
    }
}

#[derive(Debug)]
struct CountingService(HttpClient);

#[async_trait::async_trait]
impl HttpService for CountingService {
    async fn call(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        COUNTERS.requests.fetch_add(1, Ordering::Relaxed);
        let response = self.0.execute(request).await;
        let failed = match &response {
            Ok(response) => response.status().is_server_error() || response.status().as_u16() == 429,
            Err(_) => true,
        };
        if failed {
            COUNTERS.failed_attempts.fetch_add(1, Ordering::Relaxed);
        }
        // A body that fails (a store that stalls or cuts a download) is retried from where it
        // stopped: that attempt counts too.
        response.map(|response| {
            let (parts, body) = response.into_parts();
            HttpResponse::from_parts(parts, object_store::client::HttpResponseBody::new(CountingBody(body)))
        })
    }
}

/// A response body that counts its failure as a failed attempt.
struct CountingBody(object_store::client::HttpResponseBody);

impl http_body::Body for CountingBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, HttpError>>> {
        let polled = std::pin::Pin::new(&mut self.0).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Err(_))) = &polled {
            COUNTERS.failed_attempts.fetch_add(1, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}

/// The runtime the stores' requests run on: two threads of their own, so that a caller on any
/// thread (the pipeline's runtime included) can wait on a request.
static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("cnclip-storage")
        .enable_all()
        .build()
        .expect("a tokio runtime for object storage")
});

/// Runs `future` on the storage runtime and waits for it on this thread. A job that catches
/// SIGINT and SIGTERM ([`crate::signals`]) stops waiting when one arrives: the request is
/// dropped and the call fails with [`crate::signals::Stopped`].
///
/// # Errors
/// [`crate::signals::Stopped`] (as an `Other` error: readers retry `Interrupted` reads), or
/// `Other` if the request's task panicked.
pub fn run<T: Send + 'static>(future: impl Future<Output = T> + Send + 'static) -> io::Result<T> {
    let task = RUNTIME.spawn(async move {
        tokio::select! {
            out = future => Ok(out),
            signal = crate::signals::until_interrupted(), if crate::signals::catching() => Err(signal),
        }
    });
    match futures_executor::block_on(tokio::task::unconstrained(task)).map_err(io::Error::other)? {
        Ok(out) => Ok(out),
        Err(signal) => Err(crate::signals::Stopped(signal).into()),
    }
}

/// [`run`] for a future that handles signals itself (an upload aborts before it returns).
fn run_to_end<T: Send + 'static>(future: impl Future<Output = T> + Send + 'static) -> io::Result<T> {
    futures_executor::block_on(tokio::task::unconstrained(RUNTIME.spawn(future))).map_err(io::Error::other)
}

impl Remote {
    fn err(&self) -> impl Fn(object_store::Error) -> io::Error + '_ {
        |e| RemoteError::into_io(&self.url, e)
    }

    /// The whole object.
    pub fn read(&self) -> io::Result<Bytes> {
        let (store, key) = (self.store.clone(), self.key.clone());
        run(async move { store.get(&key).await?.bytes().await })?.map_err(self.err())
    }

    /// Bytes `range` of the object; `UnexpectedEof` when the object is shorter.
    pub fn read_range(&self, range: Range<u64>) -> io::Result<Bytes> {
        let wanted = range.end - range.start;
        let (store, key) = (self.store.clone(), self.key.clone());
        let bytes = run(async move { store.get_range(&key, range).await })?.map_err(self.err())?;
        if bytes.len() as u64 != wanted {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("{}: shorter than asked", self.url)));
        }
        Ok(bytes)
    }

    /// The object's size in bytes.
    pub fn size(&self) -> io::Result<u64> {
        let (store, key) = (self.store.clone(), self.key.clone());
        Ok(run(async move { store.head(&key).await })?.map_err(self.err())?.size)
    }

    /// The object's size and version: its ETag, or else its modification time (the stamp a
    /// resumable job compares: [`crate::fingerprint`]).
    pub fn version(&self) -> io::Result<(u64, String)> {
        let (store, key) = (self.store.clone(), self.key.clone());
        let meta = run(async move { store.head(&key).await })?.map_err(self.err())?;
        let version = meta.e_tag.unwrap_or_else(|| meta.last_modified.to_rfc3339());
        Ok((meta.size, version))
    }

    /// The keys under this one as a prefix (`key/…`), sorted, with their sizes.
    pub fn list(&self) -> io::Result<Vec<(ObjectPath, u64)>> {
        use futures_util::TryStreamExt;
        let (store, key) = (self.store.clone(), self.key.clone());
        let mut listed = run(async move {
            let prefix = (!key.as_ref().is_empty()).then_some(&key);
            store.list(prefix).map_ok(|meta| (meta.location, meta.size)).try_collect::<Vec<_>>().await
        })?
        .map_err(self.err())?;
        listed.sort();
        Ok(listed)
    }

    /// The object `key` of the same store, named as a URL beside this one's.
    pub fn sibling(&self, key: ObjectPath) -> Remote {
        let base = self.url.strip_suffix(self.key.as_ref()).unwrap_or(&self.url).trim_end_matches('/');
        Remote {
            url: format!("{base}/{key}"),
            store: self.store.clone(),
            multipart: self.multipart.clone(),
            place: self.place.clone(),
            key,
            writable: self.writable,
        }
    }

    fn writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::Unsupported, format!("{}: http(s):// locations are read-only", self.url)))
        }
    }

    /// Writes `contents` as the object only if there is none yet; of two writers exactly one
    /// succeeds (the store's conditional write, `If-None-Match: *`). Returns whether it wrote.
    pub fn create_if_absent(&self, contents: Bytes) -> io::Result<bool> {
        self.writable()?;
        let (store, key) = (self.store.clone(), self.key.clone());
        let result = run(async move {
            let options = object_store::PutOptions { mode: object_store::PutMode::Create, ..Default::default() };
            store.put_opts(&key, contents.into(), options).await
        })?;
        match result {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(self.err()(e)),
        }
    }

    /// Uploads the local file `from` as the object, whole or not at all: a single PUT for a small
    /// file, else a multipart upload, completed only once every part is in. A part that fails
    /// (after the store's retries), or SIGINT/SIGTERM, aborts the upload, so no part stays
    /// behind in the store. An upload that could not be aborted (the process killed, the store
    /// unreachable) is recorded in the spool's journal ([`journal_dir`]) and aborted by the next
    /// upload this machine makes.
    pub fn upload(&self, from: &std::path::Path) -> io::Result<()> {
        self.writable()?;
        abort_abandoned();
        let size = std::fs::metadata(from)?.len();
        let (store, key) = (self.store.clone(), self.key.clone());
        let multipart = self.multipart.clone().filter(|_| size > PART_BYTES as u64);
        let Some(multipart) = multipart else {
            let contents = Bytes::from(std::fs::read(from)?);
            return run(async move { store.put(&key, contents.into()).await })?.map(drop).map_err(self.err());
        };
        let (from, names) = (from.to_path_buf(), (self.url.clone(), self.place.clone()));
        run_to_end(async move { upload_parts(multipart, key, names, from).await })?.map_err(|e| match e {
            UploadError::Store(e) => self.err()(e),
            UploadError::Io(e) if e.get_ref().is_some_and(|inner| inner.is::<crate::signals::Stopped>()) => e,
            UploadError::Io(e) => io::Error::new(e.kind(), format!("uploading to {}: {e}", self.url)),
        })
    }

    /// Removes the object (a missing one is not an error).
    pub fn remove(&self) -> io::Result<()> {
        self.writable()?;
        let (store, key) = (self.store.clone(), self.key.clone());
        match run(async move { store.delete(&key).await })? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err()(e)),
        }
    }
}

/// The size of an upload's parts (and the largest file sent in one PUT).
const PART_BYTES: usize = 16 << 20;

enum UploadError {
    Store(object_store::Error),
    Io(io::Error),
}

/// Uploads `from` in parts of [`PART_BYTES`] as `key`, journaled until completed or aborted.
async fn upload_parts(
    store: Arc<dyn MultipartStore>,
    key: ObjectPath,
    (url, place): (String, String),
    from: std::path::PathBuf,
) -> Result<(), UploadError> {
    let id = store.create_multipart(&key).await.map_err(UploadError::Store)?;
    let journal = Journal::record(&url, &place, &id);
    let sent = tokio::select! {
        sent = send_parts(&*store, &key, &id, &from) => sent,
        signal = crate::signals::until_interrupted(), if crate::signals::catching() => {
            Err(UploadError::Io(crate::signals::Stopped(signal).into()))
        }
    };
    let result = match sent {
        Ok(parts) => store.complete_multipart(&key, &id, parts).await.map(drop).map_err(UploadError::Store),
        Err(e) => Err(e),
    };
    let settled = match &result {
        Ok(()) => true,
        // Aborted within a few seconds, or left to the journal: a stopped job must exit quickly.
        Err(_) => matches!(
            tokio::time::timeout(ABORT_WAIT, store.abort_multipart(&key, &id)).await,
            Ok(Ok(()) | Err(object_store::Error::NotFound { .. }))
        ),
    };
    if settled {
        journal.remove();
    }
    result
}

/// How long a failed or stopped upload waits for its abort.
const ABORT_WAIT: Duration = Duration::from_secs(3);

/// Sends the parts of `from`, two at a time, in order of their index.
async fn send_parts(
    store: &dyn MultipartStore,
    key: &ObjectPath,
    id: &object_store::MultipartId,
    from: &std::path::Path,
) -> Result<Vec<object_store::multipart::PartId>, UploadError> {
    use futures_util::StreamExt;
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(from).await.map_err(UploadError::Io)?;
    let mut chunks = Vec::new();
    let mut parts = Vec::new();
    loop {
        let mut buffer = vec![0u8; PART_BYTES];
        let mut filled = 0;
        while filled < buffer.len() {
            let n = file.read(&mut buffer[filled..]).await.map_err(UploadError::Io)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled > 0 {
            buffer.truncate(filled);
            chunks.push(Bytes::from(buffer));
        }
        let last = filled < PART_BYTES;
        // Two parts in flight at most: memory stays bounded whatever the file's size.
        if chunks.len() == 2 || (last && !chunks.is_empty()) {
            let start = parts.len();
            let sent = futures_util::stream::iter(chunks.drain(..).enumerate())
                .map(|(i, chunk)| store.put_part(key, id, start + i, chunk.into()))
                .buffered(2)
                .collect::<Vec<_>>()
                .await;
            for part in sent {
                parts.push(part.map_err(UploadError::Store)?);
            }
        }
        if last {
            return Ok(parts);
        }
    }
}

/// Where uploads in progress are recorded: `$TMPDIR/cnclip-spool/uploads/`.
pub fn journal_dir() -> std::path::PathBuf {
    std::env::temp_dir().join("cnclip-spool/uploads")
}

/// One upload's record in the journal: a file naming its process, URL and upload id.
struct Journal(Option<std::path::PathBuf>);

#[derive(serde::Serialize, serde::Deserialize)]
struct JournalEntry {
    pid: u32,
    url: String,
    /// The store's [`Store::place`]: the upload is aborted only where it was begun.
    place: String,
    id: String,
}

impl Journal {
    fn record(url: &str, place: &str, id: &str) -> Journal {
        use sha2::Digest;
        let dir = journal_dir();
        let hash = sha2::Sha256::digest(format!("{url}\n{id}"));
        let name: String = hash[..12].iter().map(|b| format!("{b:02x}")).collect();
        let path = dir.join(format!("{name}.json"));
        let entry = JournalEntry {
            pid: std::process::id(),
            url: url.to_string(),
            place: place.to_string(),
            id: id.to_string(),
        };
        let written = std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(&path, serde_json::to_vec(&entry).expect("serialisable")));
        match written {
            Ok(()) => Journal(Some(path)),
            Err(e) => {
                tracing::warn!(url, error = %e, "could not journal a multipart upload: if this job is killed, it stays in the store");
                Journal(None)
            }
        }
    }

    fn remove(self) {
        if let Some(path) = self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Aborts the uploads the journal holds for processes that are gone (killed mid-upload, or
/// unable to reach the store to abort), once per process.
fn abort_abandoned() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(entries) = std::fs::read_dir(journal_dir()) else { return };
        for entry in entries.flatten() {
            let Ok(text) = std::fs::read(entry.path()) else { continue };
            let Ok(record) = serde_json::from_slice::<JournalEntry>(&text) else {
                let _ = std::fs::remove_file(entry.path());
                continue;
            };
            if super::staging::alive(record.pid) {
                continue;
            }
            // Another store's upload (the same bucket name at another endpoint) waits for a job
            // configured for that store.
            let Ok(remote) = parse(&record.url) else { continue };
            let Some(store) = remote.multipart.clone().filter(|_| remote.place == record.place) else { continue };
            let (key, id) = (remote.key.clone(), record.id.clone());
            let aborted = run(async move { store.abort_multipart(&key, &id).await });
            if matches!(aborted, Ok(Ok(()) | Err(object_store::Error::NotFound { .. }))) {
                tracing::info!(url = record.url, "Aborted an upload a stopped cnclip job left");
                let _ = std::fs::remove_file(entry.path());
            }
        }
    });
}

/// A reader of an object from an offset that fetches only as it is read: ranged GETs, each
/// twice the last, from [`FIRST_READ_BYTES`] up to [`CHUNK_BYTES`]. The Parquet reader opens one
/// per page header (`ChunkReader::get_read`), reads a few hundred bytes and drops it: a
/// [`RemoteReader`] there would start megabytes of GETs for each.
pub struct LazyReader {
    remote: Remote,
    position: u64,
    end: u64,
    next: u64,
    current: Bytes,
}

/// The first GET of a [`LazyReader`].
pub const FIRST_READ_BYTES: u64 = 64 << 10;

impl LazyReader {
    /// Reads `remote` from `start` up to `end` (its size).
    pub fn new(remote: &Remote, start: u64, end: u64) -> LazyReader {
        LazyReader { remote: remote.clone(), position: start, end, next: FIRST_READ_BYTES, current: Bytes::new() }
    }
}

impl io::Read for LazyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.current.is_empty() {
            if self.position >= self.end || buf.is_empty() {
                return Ok(0);
            }
            let len = self.next.min(self.end - self.position);
            self.current = self.remote.read_range(self.position..self.position + len)?;
            if self.current.is_empty() {
                return Ok(0);
            }
            self.position += self.current.len() as u64;
            self.next = (self.next * 2).min(CHUNK_BYTES);
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// A streaming reader of an object: ranged GETs of [`CHUNK_BYTES`], [`IN_FLIGHT`] of them ahead
/// of the one being read (one connection's speed is far below what a few give, on every store):
/// memory stays bounded (about `(IN_FLIGHT + 2) × CHUNK_BYTES`) however large the object.
/// Dropping the reader cancels the requests in flight; a caught signal stops a reader that waits.
///
/// A GET's body is copied into a buffer from the pooled (`spare`) chunk buffers, and the buffer goes back
/// there once read: a stream of shards allocates its chunk buffers once, not once a shard. The
/// requests are tasks on the storage runtime that the reader's own thread starts and waits for,
/// with no thread of the reader's own. (Allocated afresh, each shard's 8 MiB buffers were freed
/// memory that the allocator keeps for its purge delay, a second's worth of reading; and a
/// thread per shard left the allocator a heap per shard to reclaim: the resident size of a long
/// read from a store grew by 40 MiB over 400 shards, where a read from disk stays flat.)
pub struct RemoteReader {
    remote: Remote,
    /// Where the next range to ask for starts, and the end of the last.
    next: u64,
    end: u64,
    /// The GETs asked for, in the object's order.
    pending: std::collections::VecDeque<tokio::task::JoinHandle<io::Result<Vec<u8>>>>,
    current: Vec<u8>,
    /// How much of `current` has been read.
    at: usize,
    /// The error that stopped the reading, given again on every later read (a read after it
    /// must not look like the object's end).
    failed: Option<(io::ErrorKind, String)>,
}

/// The bytes of one ranged GET.
pub const CHUNK_BYTES: u64 = 8 << 20;
/// Ranged GETs a reader keeps in flight.
pub const IN_FLIGHT: usize = 3;

/// Chunk buffers that readers have finished with, for the next chunks: at most one reader's
/// worth is kept (the rest are freed), so the pool holds at most `(IN_FLIGHT + 2) × CHUNK_BYTES`.
mod spare {
    use std::sync::Mutex;

    static BUFFERS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
    const KEPT: usize = super::IN_FLIGHT + 2;

    /// An empty buffer, with the capacity of a chunk read before if one is spare.
    pub(super) fn take() -> Vec<u8> {
        BUFFERS.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default()
    }

    /// Gives `buffer` back for a later chunk.
    pub(super) fn give(mut buffer: Vec<u8>) {
        if buffer.capacity() == 0 {
            return;
        }
        buffer.clear();
        let mut buffers = BUFFERS.lock().unwrap_or_else(|e| e.into_inner());
        if buffers.len() < KEPT {
            buffers.push(buffer);
        }
    }
}

impl Remote {
    /// Bytes `range` of the object, into `buffer` (emptied first): the body is copied as it
    /// comes, without a buffer of its own. `UnexpectedEof` when the object is shorter.
    async fn read_range_into(&self, range: Range<u64>, mut buffer: Vec<u8>) -> io::Result<Vec<u8>> {
        use futures_util::StreamExt;
        let wanted = range.end - range.start;
        buffer.clear();
        buffer.reserve_exact(usize::try_from(wanted).map_err(io::Error::other)?);
        let options = object_store::GetOptions::new().with_range(Some(range));
        let got = self.store.get_opts(&self.key, options).await.map_err(self.err())?;
        let mut body = got.into_stream();
        while let Some(piece) = body.next().await {
            let piece = piece.map_err(self.err())?;
            if (buffer.len() + piece.len()) as u64 > wanted {
                return Err(io::Error::other(format!("{}: a ranged read gave more than asked", self.url)));
            }
            buffer.extend_from_slice(&piece);
        }
        if buffer.len() as u64 != wanted {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("{}: shorter than its size", self.url)));
        }
        Ok(buffer)
    }
}

impl RemoteReader {
    /// Starts reading `remote`.
    ///
    /// # Errors
    /// The object's size cannot be had (missing: `NotFound`).
    pub fn open(remote: &Remote) -> io::Result<RemoteReader> {
        let size = remote.size()?;
        Self::open_range(remote, 0, size)
    }

    /// Reads `remote` from byte `start` to `size` (its size, known to the caller).
    ///
    /// # Errors
    /// None today; kept for the callers, who open with a fallible call.
    pub fn open_range(remote: &Remote, start: u64, size: u64) -> io::Result<RemoteReader> {
        let mut reader = RemoteReader {
            remote: remote.clone(),
            next: start,
            end: size,
            pending: std::collections::VecDeque::new(),
            current: Vec::new(),
            at: 0,
            failed: None,
        };
        reader.ask();
        Ok(reader)
    }

    /// Asks for the next ranges, up to [`IN_FLIGHT`] GETs ahead.
    fn ask(&mut self) {
        while self.pending.len() < IN_FLIGHT && self.next < self.end {
            let range = self.next..(self.next + CHUNK_BYTES).min(self.end);
            self.next = range.end;
            let remote = self.remote.clone();
            self.pending.push_back(RUNTIME.spawn(async move { remote.read_range_into(range, spare::take()).await }));
        }
    }

    /// Waits for the next chunk (`None` after the last).
    fn next_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        let Some(task) = self.pending.pop_front() else { return Ok(None) };
        self.ask();
        // A caught signal ends the wait: the request waited for is cancelled too.
        let abort = task.abort_handle();
        let chunk = run(task).inspect_err(|_| abort.abort())?.map_err(io::Error::other)??;
        Ok(Some(chunk))
    }

    fn cancel(&mut self) {
        for task in self.pending.drain(..) {
            task.abort();
        }
    }
}

impl io::Read for RemoteReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.current.len() {
            if let Some((kind, message)) = &self.failed {
                return Err(io::Error::new(*kind, message.clone()));
            }
            spare::give(std::mem::take(&mut self.current));
            self.at = 0;
            match self.next_chunk() {
                Ok(Some(chunk)) => self.current = chunk,
                Ok(None) => return Ok(0),
                Err(e) => {
                    self.cancel();
                    self.failed = Some((e.kind(), e.to_string()));
                    return Err(e);
                }
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl Drop for RemoteReader {
    fn drop(&mut self) {
        self.cancel();
        spare::give(std::mem::take(&mut self.current));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_profiles_parse() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2min"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("soon"), None);
        let ini =
            "[default]\naws_access_key_id = A\n\n[profile lab]\nregion=cn-north-1\n# c\nendpoint_url = http://x\n";
        assert_eq!(ini_section(ini, "default"), [("aws_access_key_id".to_string(), "A".to_string())]);
        assert_eq!(
            ini_section(ini, "profile lab"),
            [("region".to_string(), "cn-north-1".to_string()), ("endpoint_url".to_string(), "http://x".to_string())]
        );
    }

    #[test]
    fn urls_name_a_bucket_and_a_key() {
        let remote = parse("s3://bucket/corpus/shard-0.tar").unwrap();
        assert_eq!(remote.key.as_ref(), "corpus/shard-0.tar");
        assert_eq!(remote.sibling(ObjectPath::from("corpus/x.json")).url, "s3://bucket/corpus/x.json");
        assert!(parse("s3:///key").unwrap_err().to_string().contains("names no bucket"));
        assert!(!parse("https://example.com/data/x.parquet").unwrap().writable);
    }
}
