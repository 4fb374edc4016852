//! The webhook publisher in the publisher conformance suite.
//!
//! One receiver per test process (an axum server on its own thread and
//! runtime, bound to `127.0.0.1:0`) plays the broker: each harness registers
//! a path of its own, `/hooks/<unique>/DonorSecured`, and posts to
//! `/hooks/<unique>/{type}`. The receiver checks every request with
//! `verify_and_decode` and records its event per path, in arrival order; a
//! path nobody registered (another event type) gets `404`, which makes such
//! an event unroutable.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use proclaim_core::Event;
use proclaim_testkit::events::{of_type, record};
use proclaim_testkit::publisher_conformance::{Delivered, PublisherCapabilities, PublisherHarness};
use proclaim_webhook::{WEBHOOK_ID, WebhookConfig, WebhookPublisher, verify_and_decode};

use crate::secret;

/// The event type every conformance event has: the one path registered.
const ROUTED_TYPE: &str = "DonorSecured";

type Hooks = Arc<Mutex<HashMap<String, Vec<Delivered>>>>;

/// The process-wide receiver.
struct Receiver {
    addr: SocketAddr,
    hooks: Hooks,
}

fn receiver() -> &'static Receiver {
    static RECEIVER: OnceLock<Receiver> = OnceLock::new();
    RECEIVER.get_or_init(|| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let hooks = Hooks::default();
        let state = hooks.clone();
        std::thread::Builder::new()
            .name("webhook-receiver".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    let app = Router::new().fallback(
                        move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                            let hooks = state.clone();
                            async move { receive(&hooks, &method, &uri, &headers, &body) }
                        },
                    );
                    axum::serve(listener, app).await.unwrap();
                });
            })
            .unwrap();
        Receiver { addr, hooks }
    })
}

fn receive(
    hooks: &Hooks,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> (StatusCode, String) {
    if method != Method::POST {
        return (StatusCode::METHOD_NOT_ALLOWED, "POST only".into());
    }
    let event = match verify_and_decode(&secret(), headers, body) {
        Ok(event) => event,
        Err(e) => {
            tracing::warn!(error = %e, path = uri.path(), "receiver rejected a request");
            return (StatusCode::UNAUTHORIZED, e.to_string());
        }
    };
    let mut hooks = hooks.lock().unwrap();
    let Some(received) = hooks.get_mut(uri.path()) else {
        return (
            StatusCode::NOT_FOUND,
            format!("no webhook at {}", uri.path()),
        );
    };
    received.push(Delivered {
        event,
        dedup_id: headers
            .get(WEBHOOK_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    });
    (StatusCode::OK, "ok".into())
}

/// A path of its own on the receiver and a publisher to it.
pub(crate) struct Webhook {
    suffix: String,
    config: WebhookConfig,
    publisher: WebhookPublisher,
}

impl Webhook {
    fn url(suffix: &str, via: SocketAddr) -> String {
        format!("http://{via}/hooks/{suffix}/{{type}}")
    }

    fn path(&self) -> String {
        format!("/hooks/{}/{ROUTED_TYPE}", self.suffix)
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        if let Ok(mut hooks) = receiver().hooks.lock() {
            hooks.remove(&self.path());
        }
    }
}

impl PublisherHarness for Webhook {
    type Publisher = WebhookPublisher;
    const CAPABILITIES: PublisherCapabilities = PublisherCapabilities {
        broker_dedup: false,
        unroutable: true,
    };

    fn broker() -> SocketAddr {
        receiver().addr
    }

    async fn setup(via: SocketAddr, timeout: Duration) -> Self {
        let suffix = proclaim_testkit::unique_suffix();
        let config = WebhookConfig::new(Self::url(&suffix, via))
            .with_secret(secret())
            .with_timeout(timeout)
            .with_connect_timeout(timeout);
        let publisher = WebhookPublisher::new(config.clone()).unwrap();
        let harness = Webhook {
            suffix,
            config,
            publisher,
        };
        receiver()
            .hooks
            .lock()
            .unwrap()
            .insert(harness.path(), Vec::new());
        harness
    }

    fn publisher(&self) -> &WebhookPublisher {
        &self.publisher
    }

    async fn connect(&self, via: SocketAddr) -> Result<WebhookPublisher, String> {
        let config = self.config.clone().with_url(Self::url(&self.suffix, via));
        WebhookPublisher::new(config).map_err(|e| e.to_string())
    }

    async fn received(&self, n: usize, wait: Duration) -> Vec<Delivered> {
        let path = self.path();
        let snapshot = || {
            receiver()
                .hooks
                .lock()
                .unwrap()
                .get(&path)
                .cloned()
                .unwrap_or_default()
        };
        let deadline = tokio::time::Instant::now() + wait;
        while snapshot().len() < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        snapshot()
    }

    fn unroutable(&self) -> Option<Event> {
        // Posted to /hooks/<unique>/NoSuchHook, a path the receiver does not
        // know: 404, a permanent error.
        Some(of_type("NoSuchHook"))
    }
}

proclaim_testkit::publisher_conformance!(Webhook);

/// The suite only logs the unroutable error; here its class is checked too.
#[tokio::test]
async fn an_unroutable_event_is_a_permanent_error_naming_the_404() {
    use proclaim_core::Publisher;
    let h = Webhook::setup(Webhook::broker(), Duration::from_secs(2)).await;
    let event = h.unroutable().unwrap();
    let err = h
        .publisher()
        .publish(&record(event.clone()))
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "{}", err.full_message());
    let text = err.to_string();
    assert!(text.contains("404 Not Found"), "{text}");
    assert!(
        text.contains(&format!("no webhook at /hooks/{}/NoSuchHook", h.suffix)),
        "{text}"
    );
    assert!(h.received(1, Duration::from_millis(200)).await.is_empty());
}
