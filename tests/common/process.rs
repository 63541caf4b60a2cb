//! creditd under test: in this process, or as the real binary (for signals, crashes and
//! restarts), and other programs run to their end within a bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use creditd::config::Config;
use creditd::server::Server;
use hyper::StatusCode;

use super::{Client, TOKEN};

/// A config for tests: loopback port 0, a fresh data folder, the test token, fast settling.
pub fn test_config(data_dir: &Path) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.to_path_buf(),
        admin_token: Some(TOKEN.to_string()),
        settle_interval: Duration::from_millis(50),
        shutdown_grace: Duration::from_secs(5),
        ..Config::default()
    }
}

/// creditd running in this process.
pub struct TestNode {
    pub server: Server,
    pub client: Client,
    pub dir: tempfile::TempDir,
}

impl TestNode {
    /// Starts a node with the test config, changed by `tweak`.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestNode {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(dir.path());
        tweak(&mut config);
        let server = Server::start(config.validate().expect("valid test config"), None)
            .await
            .expect("start creditd");
        let client = Client::new(server.addr());
        TestNode {
            server,
            client,
            dir,
        }
    }

    pub async fn start() -> TestNode {
        Self::start_with(|_| {}).await
    }

    pub async fn stop(self) -> tempfile::TempDir {
        self.server.shutdown().await.expect("clean shutdown");
        self.dir
    }
}

/// The creditd binary built for these tests.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_creditd"))
}

/// A free loopback port: bind :0, read the port, close. Only for processes that must be told
/// a port up front (the binary, redis-server).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// creditd running as a child process (for signals, crashes and restarts).
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
    pub client: Client,
}

impl Process {
    /// Starts the binary with `CREDITD_*` variables `env` (listen and token are set here) and
    /// waits until /readyz answers 200.
    pub async fn spawn(data_dir: &Path, env: &[(&str, &str)]) -> Process {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut cmd = Command::new(binary());
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CREDITD_LISTEN", addr.to_string())
            .env("CREDITD_DATA_DIR", data_dir)
            .env("CREDITD_ADMIN_TOKEN", TOKEN)
            .env("CREDITD_SETTLE_INTERVAL", "50ms")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn creditd");
        let process = Process {
            child,
            addr,
            client: Client::new(addr),
        };
        process.wait_ready().await;
        process
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Ok(stream)) = tokio::time::timeout(
                Duration::from_secs(1),
                tokio::net::TcpStream::connect(self.addr),
            )
            .await
            {
                drop(stream);
                if self.client.get("/readyz").await.status == StatusCode::OK {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "creditd at {} not ready within 30s",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        wait_exit(&mut self.child, Duration::from_secs(30))
    }

    /// SIGKILL: a hard crash.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = wait_exit(&mut self.child, Duration::from_secs(30));
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for a child to exit, polling, at most `limit`.
pub fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "process did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a finished child process printed.
pub struct Finished {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to its end: pipes its stdout and stderr (each drained on its own thread, so a
/// large output cannot block the child), writes `stdin` if given, and waits at most `limit`;
/// past that the child is killed and the test fails. `what` names the program in failures.
pub fn run_bounded(mut cmd: Command, stdin: Option<&str>, limit: Duration, what: &str) -> Finished {
    use std::io::{Read, Write};
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("write to {what}: {e}"));
    }
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut s);
            }
            s
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            // Never leave a stray process behind a failed test.
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Finished {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// Runs the creditd binary with exactly the variables `env` (plus PATH) in `cwd`, waits at most
/// `limit` for it to exit, and returns its status and stderr. For commands that exit by
/// themselves (a refused configuration, `healthcheck`).
pub fn run_binary(
    args: &[&str],
    env: &[(&str, &str)],
    cwd: &Path,
    limit: Duration,
) -> (std::process::ExitStatus, String) {
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .current_dir(cwd)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let done = run_bounded(cmd, None, limit, &format!("creditd {args:?}"));
    (done.status, done.stderr)
}

/// Sends a signal to a process with `kill` (no libc in the dev-dependencies).
pub fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(sig)
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} {pid} failed");
}
