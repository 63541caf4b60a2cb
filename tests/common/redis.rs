//! Real `redis-server` processes for tests: a standalone server or a 3-master cluster, each on
//! free loopback ports, with no persistence, killed on drop. Never a mock, never the machine's
//! Redis on 6379; if `redis-server` is missing or cannot start, the test fails loudly.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use super::process::signal;

/// Longest wait for a server to answer PING after it was started.
const START_WAIT_MAX: Duration = Duration::from_secs(15);
/// Longest wait for a new cluster to report `cluster_state:ok` everywhere.
const CLUSTER_WAIT_MAX: Duration = Duration::from_secs(60);
/// Attempts at finding free ports and starting on them (another process may take a port
/// between the check and the start).
const START_ATTEMPTS_MAX: usize = 8;
const POLL: Duration = Duration::from_millis(20);

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A port the kernel just gave out (free now; taken back at once).
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    listener.local_addr().expect("local addr").port()
}

/// A port `p` with `p + 10000` (its cluster bus) free too.
fn free_cluster_port() -> u16 {
    // A xorshift walk seeded by the clock and the pid: parallel tests start apart.
    let mut x = (std::process::id() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
        | 1;
    for _ in 0..1000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = 20000 + (x % 25000) as u16;
        if port_is_free(port) && port_is_free(port + 10000) {
            return port;
        }
    }
    panic!("found no free port p with p+10000 free in 20000..45000 after 1000 tries");
}

/// Synchronous connection to `port`, bounded.
pub fn connect(port: u16) -> redis::RedisResult<redis::Connection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}/"))?
        .get_connection_with_timeout(Duration::from_secs(2))
}

/// Sends one command to `port` and returns its answer.
pub fn command(port: u16, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let mut con = connect(port)?;
    con.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut con)
}

fn answers_ping(port: u16) -> bool {
    matches!(command(port, &["PING"]), Ok(redis::Value::SimpleString(ref s)) if s == "PONG")
}

/// One `redis-server` child process.
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a standalone server on a free loopback port.
    pub fn start() -> RedisServer {
        Self::start_with(Vec::new(), free_port)
    }

    /// Starts a standalone server that keeps its data across [`restart`](Self::restart): an
    /// append-only file, fsynced on every write, in the server's own temp dir.
    pub fn start_persistent() -> RedisServer {
        Self::start_with(
            ["--appendonly", "yes", "--appendfsync", "always"]
                .map(String::from)
                .to_vec(),
            free_port,
        )
    }

    fn start_with(extra: Vec<String>, pick: fn() -> u16) -> RedisServer {
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS_MAX {
            let mut server = RedisServer {
                port: pick(),
                dir: tempfile::tempdir().expect("temp dir for redis-server"),
                extra: extra.clone(),
                child: None,
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!(
            "redis-server could not start after {START_ATTEMPTS_MAX} attempts: {last_error}\n\
             (these tests need redis-server on PATH: apt-get install -y redis-server)"
        );
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the process on `self.port` and waits until it answers PING.
    fn spawn(&mut self) -> Result<(), String> {
        let port = self.port.to_string();
        let dir = self.dir.path().to_string_lossy().to_string();
        let log = self.log_path().to_string_lossy().to_string();
        let mut args: Vec<String> = vec![
            "--port".into(),
            port,
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            "".into(),
            "--appendonly".into(),
            "no".into(),
            "--daemonize".into(),
            "no".into(),
            "--dir".into(),
            dir,
            "--logfile".into(),
            log,
        ];
        args.extend(self.extra.iter().cloned());
        let child = Command::new("redis-server")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run redis-server: {e} (is it installed and on PATH?)"))?;
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if answers_ping(self.port) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                    return Err(format!(
                        "redis-server on port {} exited with {status}: {log}",
                        self.port
                    ));
                }
            }
            if started.elapsed() > START_WAIT_MAX {
                self.stop();
                return Err(format!(
                    "redis-server on port {} did not answer PING within {START_WAIT_MAX:?}",
                    self.port
                ));
            }
            sleep(POLL);
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis-server is running").id()
    }

    /// Kills the server (like a crash; nothing is saved) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server and starts a new one on the same port and data dir: an empty Redis
    /// after [`start`](Self::start) (no persistence), the same data after
    /// [`start_persistent`](Self::start_persistent).
    pub fn restart(&mut self) {
        self.stop();
        let started = Instant::now();
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if started.elapsed() > START_WAIT_MAX => {
                    panic!("redis-server did not restart on port {}: {e}", self.port)
                }
                Err(_) => sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        signal(self.pid(), "-STOP");
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        signal(self.pid(), "-CONT");
    }

    /// Sends one command and returns its answer; panics on an error.
    pub fn cmd(&self, args: &[&str]) -> redis::Value {
        command(self.port, args).unwrap_or_else(|e| panic!("redis {args:?} failed: {e}"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_ref() {
            // A paused server must be thawed to die cleanly; SIGKILL works either way.
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(child.id().to_string())
                .status();
        }
        self.stop();
    }
}

/// A Redis Cluster of 3 masters (no replicas), each a [`RedisServer`].
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                // Relative to the server's own --dir: a temp dir per server.
                RedisServer::start_with(
                    vec![
                        "--cluster-enabled".into(),
                        "yes".into(),
                        "--cluster-config-file".into(),
                        "nodes.conf".into(),
                        "--cluster-node-timeout".into(),
                        "5000".into(),
                    ],
                    free_cluster_port,
                )
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let output = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create (is redis-cli installed?)");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = RedisCluster { nodes };
        let started = Instant::now();
        loop {
            let all_ok = cluster.nodes.iter().all(|n| {
                matches!(command(n.port(), &["CLUSTER", "INFO"]),
                    Ok(redis::Value::BulkString(ref b)) if String::from_utf8_lossy(b).contains("cluster_state:ok"))
            });
            if all_ok {
                return cluster;
            }
            assert!(
                started.elapsed() < CLUSTER_WAIT_MAX,
                "cluster on {addrs:?} did not reach cluster_state:ok within {CLUSTER_WAIT_MAX:?}"
            );
            sleep(Duration::from_millis(50));
        }
    }

    /// The seed list creditd takes: every master's URL, comma-separated.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port()))
            .collect::<Vec<_>>()
            .join(",")
    }
}
