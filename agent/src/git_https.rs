//! Git's smart HTTP protocol over rustls, as libgit2's `https` transport.
//!
//! libgit2 does TLS with OpenSSL, which would be the only user of OpenSSL in the agent: its
//! libraries are 4.4 MiB of an idle agent's memory. Registered as the `https` transport,
//! this module carries libgit2's smart protocol (the pkt-lines, negotiation and pack stay
//! libgit2's) over HTTP/1.1 requests made with ureq on the rustls (ring) the agent already
//! uses for MQTT. That is how cargo's `git2-curl` does it with libcurl.
//!
//! A fetch's settings (trust, credential, timeout) reach the transport through
//! [`with_fetch`]: libgit2 runs a fetch's transport on the thread that called `fetch`, and
//! the transport is built per fetch from what that thread set. The rules the credential
//! callback used to enforce hold here: a token is sent only over https, only to URLs its
//! `url_prefix` covers, and never after a redirect (redirects are refused).

use std::cell::RefCell;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use git2::transport::{Service, SmartSubtransport, SmartSubtransportStream, Transport};

use crate::config::GitCredential;
use crate::decide::SourceUrl;

/// What one fetch's https requests use.
#[derive(Clone)]
pub struct FetchSettings {
    /// `git.ca_file`: the only trust when set (read on every fetch), else the system store.
    pub ca_file: Option<PathBuf>,
    /// The credential for the fetched URL, with its parsed `url_prefix`.
    pub credential: Option<(SourceUrl, GitCredential)>,
    /// Bound on each request, connection to last byte.
    pub timeout: Duration,
    /// Why the last request failed, in our words (libgit2 replaces a transport's error
    /// with its own in some paths, so the caller reads it from here).
    pub failure: Arc<Mutex<Option<String>>>,
}

impl FetchSettings {
    fn fail(&self, why: String) -> std::io::Error {
        if let Ok(mut f) = self.failure.lock() {
            *f = Some(why.clone());
        }
        std::io::Error::other(why)
    }
}

thread_local! {
    static CURRENT: RefCell<Option<FetchSettings>> = const { RefCell::new(None) };
}

/// Runs `f` (a libgit2 fetch) with `settings` for the https requests it makes on this thread.
pub fn with_fetch<T>(settings: FetchSettings, f: impl FnOnce() -> T) -> T {
    register();
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            CURRENT.with(|c| c.borrow_mut().take());
        }
    }
    CURRENT.with(|c| *c.borrow_mut() = Some(settings));
    let _reset = Reset;
    f()
}

/// Registers the transport with libgit2, once per process. Binaries call it before they
/// start threads; [`with_fetch`] calls it too (a no-op after the first time).
pub fn register() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: git2 marks registration unsafe because libgit2's transport list is not
        // locked: registering must not race another thread creating a transport. `Once`
        // makes this the only registration, and the binaries call it at startup, before
        // any thread runs a fetch.
        #[allow(unsafe_code)]
        let registered = unsafe {
            git2::transport::register("https", |remote| {
                let settings = CURRENT.with(|c| c.borrow().clone()).unwrap_or_else(|| {
                    // A fetch outside `with_fetch` (tests, tools): system trust, no token.
                    FetchSettings {
                        ca_file: None,
                        credential: None,
                        timeout: Duration::from_secs(300),
                        failure: Arc::default(),
                    }
                });
                Transport::smart(
                    remote,
                    true,
                    Https {
                        settings,
                        client: Arc::default(),
                    },
                )
            })
        };
        if let Err(e) = registered {
            tracing::error!(error = %e, "cannot register the https Git transport");
        }
    });
}

struct Https {
    settings: FetchSettings,
    /// One HTTP client per fetch, built on its first request: the trust anchors are read
    /// once per fetch, and the fetch's requests share a kept-alive TLS connection.
    client: Client,
}

type Client = Arc<Mutex<Option<ureq::Agent>>>;

impl SmartSubtransport for Https {
    fn action(
        &self,
        url: &str,
        action: Service,
    ) -> Result<Box<dyn SmartSubtransportStream>, git2::Error> {
        let (service, path, post) = match action {
            Service::UploadPackLs => ("upload-pack", "/info/refs?service=git-upload-pack", false),
            Service::UploadPack => ("upload-pack", "/git-upload-pack", true),
            Service::ReceivePackLs => {
                ("receive-pack", "/info/refs?service=git-receive-pack", false)
            }
            Service::ReceivePack => ("receive-pack", "/git-receive-pack", true),
        };
        let base = url.trim_end_matches('/');
        let auth = authorization(&self.settings, base).map_err(|why| {
            let e = self.settings.fail(why);
            git2::Error::from_str(&e.to_string())
        })?;
        Ok(Box::new(Request {
            settings: self.settings.clone(),
            client: self.client.clone(),
            url: format!("{base}{path}"),
            host: host_of(base),
            service,
            post,
            auth,
            body: Vec::new(),
            response: None,
        }))
    }

    fn close(&self) -> Result<(), git2::Error> {
        Ok(())
    }
}

/// The `Authorization` header for requests under `base`: only when a credential's
/// `url_prefix` covers it, over https.
fn authorization(settings: &FetchSettings, base: &str) -> Result<Option<String>, String> {
    let Some((prefix, c)) = &settings.credential else {
        return Ok(None);
    };
    let covered = SourceUrl::parse(base).is_ok_and(|u| u.scheme == "https" && prefix.covers(&u));
    if !covered {
        return Ok(None);
    }
    let token = match (&c.token, &c.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .map_err(|e| format!("git.credentials token_file: {}", e.kind()))?
            .trim()
            .to_owned(),
        (None, None) => String::new(),
    };
    use base64::Engine as _;
    let user = c.username.as_deref().unwrap_or("x-access-token");
    Ok(Some(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{token}"))
    )))
}

/// The host of `url` for messages (IPv6 without brackets, no port), as the allow-list
/// parses it.
fn host_of(url: &str) -> String {
    SourceUrl::parse(url).map_or_else(|_| url.to_owned(), |u| u.host)
}

/// One HTTP request of the smart protocol: libgit2 writes the request body (POST), then
/// reads the response; the request goes out on the first read.
struct Request {
    settings: FetchSettings,
    client: Client,
    url: String,
    host: String,
    service: &'static str,
    post: bool,
    auth: Option<String>,
    body: Vec<u8>,
    response: Option<Box<dyn Read + Send>>,
}

impl Request {
    /// The fetch's HTTP client (built on the first request).
    fn client(&self) -> std::io::Result<ureq::Agent> {
        let mut slot = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = &*slot {
            return Ok(a.clone());
        }
        let s = &self.settings;
        let tls = roost_runtime::security::ureq_tls("git.ca_file", s.ca_file.as_deref())
            .map_err(|e| s.fail(format!("cannot verify the server's certificate: {e}")))?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .https_only(true)
            .max_redirects(0)
            .timeout_global(Some(s.timeout))
            .user_agent(concat!(
                "git/2.0 (roost-agent ",
                env!("CARGO_PKG_VERSION"),
                ")"
            ))
            .http_status_as_error(false)
            .build()
            .into();
        *slot = Some(agent.clone());
        Ok(agent)
    }

    fn send(&mut self) -> std::io::Result<Box<dyn Read + Send>> {
        let s = &self.settings;
        let agent = self.client()?;
        let result = if self.post {
            let mut r = agent
                .post(&self.url)
                .header(
                    "Content-Type",
                    format!("application/x-git-{}-request", self.service),
                )
                .header(
                    "Accept",
                    format!("application/x-git-{}-result", self.service),
                );
            if let Some(a) = &self.auth {
                r = r.header("Authorization", a);
            }
            r.send(&self.body[..])
        } else {
            let mut r = agent.get(&self.url).header("Accept", "*/*");
            if let Some(a) = &self.auth {
                r = r.header("Authorization", a);
            }
            r.call()
        };
        let response = result.map_err(|e| {
            let trust = roost_runtime::security::trust_name("git.ca_file", s.ca_file.as_deref());
            s.fail(explain(&e, &trust, &self.host))
        })?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(s.fail(match status {
                301 | 302 | 303 | 307 | 308 => format!(
                    "HTTP {status}: the server redirects, and redirects are not followed (set the rollout's URL to where the repository is)"
                ),
                401 => match self.auth {
                    Some(_) => "HTTP 401: the server refused the credential in git.credentials".to_owned(),
                    None => "HTTP 401: the server wants a credential, and git.credentials has none for this URL".to_owned(),
                },
                403 => "HTTP 403: the credential may not read this repository".to_owned(),
                404 => "HTTP 404: no such repository on the server".to_owned(),
                other => format!("HTTP {other} from the Git server"),
            }));
        }
        let expected = if self.post {
            format!("application/x-git-{}-result", self.service)
        } else {
            format!("application/x-git-{}-advertisement", self.service)
        };
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        if content_type != expected {
            return Err(s.fail(format!(
                "the server does not speak Git's smart HTTP protocol (Content-Type {content_type:?}, expected {expected:?})"
            )));
        }
        Ok(Box::new(response.into_body().into_reader()))
    }
}

/// A failed request in plain words.
fn explain(e: &ureq::Error, trust: &str, host: &str) -> String {
    // rustls' verdict comes as ureq's own variant or inside the I/O error of the handshake.
    let tls = match e {
        ureq::Error::Rustls(t) => Some(t),
        ureq::Error::Io(io) => io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        _ => None,
    };
    match (tls, e) {
        (Some(rustls::Error::InvalidCertificate(c)), _) => {
            roost_runtime::security::certificate_refused(c, "server", trust)
        }
        (Some(other), _) => format!("TLS with {host} failed: {other}"),
        (None, ureq::Error::Timeout(t)) => format!("no answer from {host} in time ({t})"),
        (None, ureq::Error::HostNotFound) => format!("cannot resolve {host}"),
        (None, ureq::Error::Io(io)) => format!("connection to {host}: {io}"),
        (None, other) => format!("request to {host}: {other}"),
    }
}

impl Read for Request {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.response.is_none() {
            self.response = Some(self.send()?);
        }
        match &mut self.response {
            Some(r) => r.read(buf),
            None => Ok(0),
        }
    }
}

impl Write for Request {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.response.is_some() {
            return Err(std::io::Error::other(
                "the request was sent already (libgit2 wrote after reading)",
            ));
        }
        self.body.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(prefix: &str, token: &str) -> FetchSettings {
        let c = GitCredential {
            url_prefix: prefix.into(),
            username: Some("ci".into()),
            token: Some(token.into()),
            token_file: None,
        };
        FetchSettings {
            ca_file: None,
            credential: Some((SourceUrl::parse(prefix).expect("prefix"), c)),
            timeout: Duration::from_secs(1),
            failure: Arc::default(),
        }
    }

    #[test]
    fn a_token_goes_only_where_its_prefix_covers() {
        let s = settings("https://git.example/org", "t0k");
        let auth = authorization(&s, "https://git.example/org/fleet.git").expect("auth");
        // base64("ci:t0k")
        assert_eq!(auth.as_deref(), Some("Basic Y2k6dDBr"));
        for elsewhere in [
            "https://git.example/org-evil/fleet.git",
            "https://git.example.evil/org/fleet.git",
            "https://git.example:8443/org/fleet.git",
        ] {
            assert_eq!(
                authorization(&s, elsewhere).expect("none"),
                None,
                "{elsewhere}"
            );
        }
    }

    #[test]
    fn hosts_for_messages() {
        assert_eq!(host_of("https://git.example:8443/a/b.git"), "git.example");
        assert_eq!(host_of("https://[::1]:443/a"), "::1");
        assert_eq!(host_of("https://127.0.0.1/a"), "127.0.0.1");
    }

    #[test]
    fn an_unreadable_token_file_is_a_clear_error() {
        let mut s = settings("https://git.example/org", "");
        if let Some((_, c)) = &mut s.credential {
            c.token = None;
            c.token_file = Some("/nonexistent/roost-token".into());
        }
        let err = authorization(&s, "https://git.example/org/x.git").expect_err("no file");
        assert!(err.contains("token_file: entity not found"), "{err}");
    }
}
