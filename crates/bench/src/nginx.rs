//! An nginx reverse-proxy hop in front of the simulator: the floor of what one extra hop costs
//! on this box, measured in the same rounds as the proxies. Configured as a gateway would run
//! it for streaming: `proxy_pass` with keep-alive upstream connections, request and response
//! buffering off, no access log, one worker per core.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub(crate) struct Nginx {
    child: Child,
    pub addr: String,
}

impl Nginx {
    /// Starts `nginx` (from PATH) with its files under `dir`, forwarding to `backend`
    /// (`http://host:port`).
    pub(crate) fn start(backend: &str, dir: &Path) -> anyhow::Result<Nginx> {
        std::fs::create_dir_all(dir)?;
        let upstream = backend
            .strip_prefix("http://")
            .context("the backend is not an http:// URL")?
            .trim_end_matches('/');
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let d = dir.display();
        let config = format!(
            r#"worker_processes auto;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream backend {{ server {upstream}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"#
        );
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config)?;
        let child = Command::new("nginx")
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("nginx (Debian's nginx-light or nginx) is not on PATH")?;
        let mut nginx = Nginx {
            child,
            addr: format!("127.0.0.1:{port}"),
        };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if start.elapsed() > Duration::from_secs(10) || nginx.child.try_wait()?.is_some() {
                let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
                bail!("nginx did not listen on {port}: {log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(nginx)
    }

    /// CPU time of the master and its workers so far, in milliseconds.
    pub(crate) fn cpu_ms(&self) -> f64 {
        let master = self.child.id().to_string();
        let mut total = crate::cpu_ms_of(&master);
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let parent = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1));
            if parent == Some(master.as_str()) {
                total += crate::cpu_ms_of(&pid);
            }
        }
        total
    }

    /// A fast shutdown (SIGTERM): the master stops its workers, which a SIGKILL of the master
    /// would leave running.
    fn terminate(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let _ = self.child.wait();
        }
    }

    pub(crate) fn stop(mut self) {
        self.terminate();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.terminate();
    }
}
