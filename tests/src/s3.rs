//! A real S3-compatible object store for the tests: `s3s-fs` (crates.io; `scripts/setup.sh`
//! builds it into `.tools/`), serving a temporary directory on 127.0.0.1 at a free port. A
//! bucket is a directory of it; the tests' commands reach it through the environment an S3
//! client reads (`AWS_ENDPOINT_URL`, the keys), as a user's job would.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The access key and secret the server is started with.
const ACCESS_KEY: &str = "cnclip-test";
const SECRET_KEY: &str = "cnclip-test-secret";

/// A running `s3s-fs`; stopped (killed) when dropped.
pub struct S3Server {
    child: Option<Child>,
    data: tempfile::TempDir,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
}

/// The `s3s-fs` binary that set-up built.
///
/// # Panics
/// When it is missing, saying how to make it.
pub fn server_bin() -> PathBuf {
    let bin = crate::workspace_root().join(".tools/s3s-fs/bin/s3s-fs");
    assert!(bin.exists(), "{} not found: run scripts/setup.sh to build the test object store", bin.display());
    bin
}

impl S3Server {
    /// Starts a server over an empty directory, at a free port.
    ///
    /// # Panics
    /// When it does not start within 30 s.
    pub fn start() -> S3Server {
        let data = tempfile::tempdir().unwrap();
        let (child, endpoint) = spawn(data.path(), 0);
        S3Server { child: Some(child), data, endpoint }
    }

    /// Makes bucket `name` (a directory of the server's) and returns its directory.
    pub fn bucket(&self, name: &str) -> PathBuf {
        let dir = self.data.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The directory the server keeps its objects in (`BUCKET/KEY`).
    pub fn data(&self) -> &Path {
        self.data.path()
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.endpoint.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// Sets the environment an S3 client reads to reach this server (and nothing of the host's
    /// own AWS set-up).
    pub fn configure<'c>(&self, command: &'c mut Command) -> &'c mut Command {
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(|k| k.starts_with("AWS_")) {
                command.env_remove(key);
            }
        }
        command
            .env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("AWS_CONFIG_FILE", "/dev/null")
    }

    /// Stops the server (SIGKILL, as a crash would), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again over the same data, at the same port.
    ///
    /// # Panics
    /// When it does not start within 30 s.
    pub fn restart(&mut self) {
        self.stop();
        let (child, endpoint) = spawn(self.data.path(), self.port());
        assert_eq!(endpoint, self.endpoint);
        self.child = Some(child);
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts `s3s-fs` over `dir` at `port` (0: a free one); returns it and its endpoint, read from
/// the line it logs once it listens.
fn spawn(dir: &Path, port: u16) -> (Child, String) {
    let start = Instant::now();
    loop {
        let mut child = Command::new(server_bin())
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", ACCESS_KEY])
            .args(["--secret-key", SECRET_KEY])
            .arg(dir)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some((_, url)) = line.split_once("server is running at ") {
                    let _ = sender.send(url.trim().to_string());
                }
                // Keep reading, so the server never blocks on a full pipe.
            }
        });
        match receiver.recv_timeout(Duration::from_secs(30)) {
            Ok(endpoint) => return (child, endpoint),
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().unwrap();
                // A restart may find its port still held for a moment.
                assert!(
                    port != 0 && start.elapsed() < Duration::from_secs(30),
                    "s3s-fs did not start at port {port} ({status})"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}
