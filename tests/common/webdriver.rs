//! A small W3C WebDriver client for the console's browser tests: starts Debian's `chromedriver`
//! on a free loopback port with headless Chromium and a fresh profile, speaks the JSON protocol
//! over the same hyper client the other tests use, and finds controls the way people using a
//! screen reader do: by role and accessible name, as the browser's accessibility tree computes
//! them (WebDriver's "Get Computed Label").
//!
//! Every command and every wait has a deadline; a wait that runs out saves a screenshot and the
//! page's text next to the other artifacts and fails with what it saw last. A missing
//! `chromium` or `chromedriver` fails the test: nothing is skipped.
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

/// The W3C name of an element reference in JSON.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// Longest one WebDriver command may take (starting a session included).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest chromedriver may take to say it is ready.
const DRIVER_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Default longest wait for something to appear on the page.
pub const WAIT: Duration = Duration::from_secs(20);
/// Pause between two looks at the page while waiting.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The flags Chromium needs on a build machine: no sandbox (root, no user namespaces), no GPU,
/// and none of the background traffic a fresh profile would otherwise start.
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
];

/// Special keys of WebDriver's "Element Send Keys".
pub mod keys {
    pub const TAB: &str = "\u{E004}";
    pub const ENTER: &str = "\u{E007}";
    pub const ESCAPE: &str = "\u{E00C}";
    pub const ARROW_DOWN: &str = "\u{E015}";
}

/// A reference to an element of the current page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element(pub String);

/// A WebDriver error answer: `error` is the protocol's code (`no such element`, `stale
/// element reference`, …).
#[derive(Debug, Clone)]
pub struct WdError {
    pub error: String,
    pub message: String,
}

impl std::fmt::Display for WdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error, self.message)
    }
}

/// What a probe passed to [`Browser::until`] returns: the value waited for, or a description of
/// what it saw instead (for the failure message).
pub type Probe<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + 'a>>;

/// A running chromedriver with one Chromium session.
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    /// Chromium's profile and chromedriver's log; removed at the end.
    profile: tempfile::TempDir,
    /// Where screenshots go.
    pub artifacts: PathBuf,
}

/// The full path of `program` on PATH, or a failure that says how to get it.
fn find_program(program: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{program} is not on PATH: the console's browser tests need Debian's {package} \
                 package (`apt-get install chromium chromium-driver`; bash .ci/run installs it)"
            )
        })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local address")
        .port()
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session. Screenshots go to `artifacts`.
    pub async fn start(artifacts: &Path) -> Browser {
        let chromium = find_program("chromium", "chromium");
        let chromedriver = find_program("chromedriver", "chromium-driver");
        std::fs::create_dir_all(artifacts).expect("artifacts folder");
        let profile = tempfile::tempdir().expect("profile folder");
        let log = std::fs::File::create(profile.path().join("chromedriver.log")).expect("log");
        let port = free_port();
        let mut command = Command::new(&chromedriver);
        command
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        // Its own process group, so that Drop can end chromedriver and the Chromium it started
        // together, even when a failed assertion skips quit().
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let driver = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", chromedriver.display()));
        let mut browser = Browser {
            driver,
            port,
            session: String::new(),
            profile,
            artifacts: artifacts.to_path_buf(),
        };
        browser.wait_driver_ready().await;
        browser.session = browser.new_session(&chromium).await;
        browser
    }

    async fn wait_driver_ready(&mut self) {
        let deadline = Instant::now() + DRIVER_START_TIMEOUT;
        loop {
            if let Some(status) = self.driver.try_wait().expect("try_wait") {
                panic!(
                    "chromedriver exited at start ({status}):\n{}",
                    self.driver_log()
                );
            }
            if let Ok(v) = self.http(Method::GET, "/status", None).await {
                if v["value"]["ready"] == true {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver not ready within {DRIVER_START_TIMEOUT:?}:\n{}",
                self.driver_log()
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    async fn new_session(&self, chromium: &Path) -> String {
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|s| s.to_string()).collect();
        args.push(format!(
            "--user-data-dir={}",
            self.profile.path().join("chromium").display()
        ));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "pageLoadStrategy": "normal",
            "timeouts": {"implicit": 0, "pageLoad": 30000, "script": 30000},
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {"binary": chromium.to_string_lossy(), "args": args},
        }}});
        let answer = self
            .http(Method::POST, "/session", Some(caps))
            .await
            .unwrap_or_else(|e| panic!("new session: {e}\n{}", self.driver_log()));
        answer["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {answer}\n{}", self.driver_log()))
            .to_string()
    }

    fn driver_log(&self) -> String {
        std::fs::read_to_string(self.profile.path().join("chromedriver.log")).unwrap_or_default()
    }

    /// One HTTP exchange with chromedriver; the JSON answer, or the protocol's error.
    async fn http(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, WdError> {
        let exchange = async {
            let transport = |e: &dyn std::fmt::Display| WdError {
                error: "transport".into(),
                message: e.to_string(),
            };
            let stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .map_err(|e| transport(&e))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| transport(&e))?;
            tokio::spawn(conn);
            let text = body.map(|b| b.to_string()).unwrap_or_default();
            let request = Request::builder()
                .method(method)
                .uri(path)
                .header("host", format!("127.0.0.1:{}", self.port))
                .header("content-type", "application/json; charset=utf-8")
                .body(Full::new(Bytes::from(text)))
                .map_err(|e| transport(&e))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| transport(&e))?;
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| transport(&e))?
                .to_bytes();
            let value: Value = serde_json::from_slice(&bytes).map_err(|e| transport(&e))?;
            match value["value"]["error"].as_str() {
                Some(error) => Err(WdError {
                    error: error.to_string(),
                    message: value["value"]["message"].as_str().unwrap_or("").to_string(),
                }),
                None => Ok(value),
            }
        };
        tokio::time::timeout(COMMAND_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(WdError {
                    error: "timeout".into(),
                    message: format!("no answer from chromedriver within {COMMAND_TIMEOUT:?}"),
                })
            })
    }

    /// A command of this session: its `value`, or the protocol's error.
    pub async fn try_command(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, WdError> {
        let url = format!("/session/{}/{path}", self.session);
        let body = body.or_else(|| (method == Method::POST).then(|| json!({})));
        self.http(method, &url, body)
            .await
            .map(|v| v["value"].clone())
    }

    /// A command that must succeed.
    pub async fn command(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        self.try_command(method.clone(), path, body)
            .await
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
    }

    pub async fn navigate(&self, url: &str) {
        self.command(Method::POST, "url", Some(json!({"url": url})))
            .await;
    }

    pub async fn current_url(&self) -> String {
        self.command(Method::GET, "url", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Every element matching a CSS selector, in document order.
    pub async fn find_all(&self, css: &str) -> Result<Vec<Element>, WdError> {
        let found = self
            .try_command(
                Method::POST,
                "elements",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await?;
        Ok(found
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e[ELEMENT_KEY].as_str().map(|id| Element(id.to_string())))
            .collect())
    }

    /// Every element below `parent` matching a CSS selector, in document order.
    pub async fn find_all_in(&self, parent: &Element, css: &str) -> Result<Vec<Element>, WdError> {
        let found = self
            .try_command(
                Method::POST,
                &format!("element/{}/elements", parent.0),
                Some(json!({"using": "css selector", "value": css})),
            )
            .await?;
        Ok(found
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e[ELEMENT_KEY].as_str().map(|id| Element(id.to_string())))
            .collect())
    }

    /// The displayed element matching `css` whose accessible name is exactly `name`.
    pub async fn find_named(&self, css: &str, name: &str) -> Result<Option<Element>, WdError> {
        for element in self.find_all(css).await? {
            if self.label(&element).await? == name && self.displayed(&element).await? {
                return Ok(Some(element));
            }
        }
        Ok(None)
    }

    /// The accessible names of the displayed elements matching `css`.
    pub async fn names(&self, css: &str) -> Result<Vec<String>, WdError> {
        let mut out = Vec::new();
        for element in self.find_all(css).await? {
            if self.displayed(&element).await? {
                out.push(self.label(&element).await?);
            }
        }
        Ok(out)
    }

    /// `GET element/{id}/{what}`: one of the element's computed facts.
    async fn element_get(&self, element: &Element, what: &str) -> Result<Value, WdError> {
        let path = format!("element/{}/{what}", element.0);
        self.try_command(Method::GET, &path, None).await
    }

    /// The accessible name the browser computes for `element`.
    pub async fn label(&self, element: &Element) -> Result<String, WdError> {
        let v = self.element_get(element, "computedlabel").await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// The ARIA role the browser computes for `element`.
    pub async fn role(&self, element: &Element) -> Result<String, WdError> {
        let v = self.element_get(element, "computedrole").await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    pub async fn displayed(&self, element: &Element) -> Result<bool, WdError> {
        Ok(self.element_get(element, "displayed").await? == true)
    }

    pub async fn enabled(&self, element: &Element) -> Result<bool, WdError> {
        Ok(self.element_get(element, "enabled").await? == true)
    }

    /// The rendered text of `element`.
    pub async fn text(&self, element: &Element) -> Result<String, WdError> {
        let v = self.element_get(element, "text").await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// A DOM property (`value`, `open`, …) of `element`.
    pub async fn property(&self, element: &Element, name: &str) -> Result<Value, WdError> {
        self.element_get(element, &format!("property/{name}")).await
    }

    /// A click as a user makes it: scrolled into view, refused if something covers the element.
    pub async fn click(&self, element: &Element) -> Result<(), WdError> {
        self.try_command(Method::POST, &format!("element/{}/click", element.0), None)
            .await
            .map(drop)
    }

    /// Focuses `element` and types `text` into it (special keys from [`keys`]).
    pub async fn send_keys(&self, element: &Element, text: &str) -> Result<(), WdError> {
        self.try_command(
            Method::POST,
            &format!("element/{}/value", element.0),
            Some(json!({"text": text})),
        )
        .await
        .map(drop)
    }

    pub async fn clear(&self, element: &Element) -> Result<(), WdError> {
        self.try_command(Method::POST, &format!("element/{}/clear", element.0), None)
            .await
            .map(drop)
    }

    /// The element that has the keyboard focus.
    pub async fn active(&self) -> Result<Element, WdError> {
        let v = self
            .try_command(Method::GET, "element/active", None)
            .await?;
        v[ELEMENT_KEY]
            .as_str()
            .map(|id| Element(id.to_string()))
            .ok_or_else(|| WdError {
                error: "no such element".into(),
                message: format!("no active element in {v}"),
            })
    }

    /// Runs `script` (a function body) in the page with `args`; its return value.
    pub async fn execute(&self, script: &str, args: Value) -> Result<Value, WdError> {
        self.try_command(
            Method::POST,
            "execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// Saves a screenshot of the page as `{name}.png` among the artifacts; its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let data = self.command(Method::GET, "screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(data.as_str().unwrap_or_default())
            .expect("screenshot is base64");
        assert!(png.starts_with(b"\x89PNG"), "screenshot is not a PNG");
        let path = self.artifacts.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        path
    }

    /// The browser's console messages since the last call (Chromium's log, level and text).
    pub async fn console_log(&self) -> Vec<(String, String)> {
        let v = self
            .command(Method::POST, "se/log", Some(json!({"type": "browser"})))
            .await;
        v.as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                (
                    e["level"].as_str().unwrap_or("").to_string(),
                    e["message"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// Polls `probe` until it returns `Ok`, for at most `limit`. On time out, saves a screenshot
    /// and the page's text as artifacts and fails with `what` and the probe's last report.
    /// A WebDriver error inside the probe (an element replaced by a refresh) is one more try.
    pub async fn until<'a, T, F>(&self, what: &str, limit: Duration, mut probe: F) -> T
    where
        F: FnMut() -> Probe<'a, T>,
    {
        let deadline = Instant::now() + limit;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let last = match probe().await {
                Ok(value) => return value,
                Err(seen) => seen,
            };
            if Instant::now() >= deadline {
                let name: String = what
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                    .take(60)
                    .collect();
                let shot = self.screenshot(&format!("timeout-{name}")).await;
                let page = self
                    .execute("return document.body.innerText;", json!([]))
                    .await
                    .unwrap_or_default();
                panic!(
                    "not within {limit:?} ({attempts} looks): {what}\nlast seen: {last}\n\
                     screenshot: {}\npage text:\n{}",
                    shot.display(),
                    page.as_str().unwrap_or_default()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Ends the session (Chromium closes) and chromedriver.
    pub async fn quit(self) {
        let url = format!("/session/{}", self.session);
        let _ = self.http(Method::DELETE, &url, None).await;
        // Drop ends chromedriver.
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group (chromedriver and the Chromium it started), while chromedriver is not
        // yet reaped, so that its process-group id cannot have been reused by anyone else.
        let group = format!("-{}", self.driver.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
