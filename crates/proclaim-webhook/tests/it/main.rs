//! Integration tests against real HTTP servers: each test starts its own
//! axum server on `127.0.0.1:0` (the conformance suite shares one receiver
//! per process, see `conformance.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use proclaim_core::{Event, PublishError, Publisher};
use proclaim_testkit::events::{donor_secured, record};
use proclaim_testkit::net::{SilentServer, free_addr};
use proclaim_testkit::proxy::FaultProxy;
use proclaim_webhook::{
    ContentMode, DecodeError, STRUCTURED_CONTENT_TYPE, Verifier, VerifyError, WEBHOOK_ID,
    WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP, WebhookConfig, WebhookError, WebhookPublisher,
    WebhookSecret, decode_request, verify_and_decode,
};

mod conformance;

/// The signing secret of every test.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn secret() -> WebhookSecret {
    WebhookSecret::new(SECRET).unwrap()
}

/// One request as a test server saw it.
#[derive(Debug, Clone)]
struct Captured {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

/// A test server: records every request and answers with `respond(n)` for
/// the n-th request (0-based). Stops when dropped.
struct Server {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Captured>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    async fn start(respond: impl Fn(usize) -> Response + Clone + Send + Sync + 'static) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<Captured>>> = Arc::default();
        let log = requests.clone();
        let counter = Arc::new(AtomicUsize::new(0));
        let app = Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
            let (log, counter, respond) = (log.clone(), counter.clone(), respond.clone());
            async move {
                log.lock().unwrap().push(Captured {
                    path: uri.to_string(),
                    headers,
                    body,
                });
                respond(counter.fetch_add(1, Ordering::SeqCst))
            }
        });
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Server {
            addr,
            requests,
            task,
        }
    }

    /// A server that answers every request with 200.
    async fn ok() -> Server {
        Server::start(|_| StatusCode::OK.into_response()).await
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn requests(&self) -> Vec<Captured> {
        self.requests.lock().unwrap().clone()
    }
}

fn publisher(config: WebhookConfig) -> WebhookPublisher {
    WebhookPublisher::new(config).unwrap()
}

fn header<'a>(c: &'a Captured, name: &str) -> Option<&'a str> {
    c.headers.get(name).and_then(|v| v.to_str().ok())
}

async fn fails(publisher: &WebhookPublisher, event: Event) -> PublishError {
    publisher.publish(&record(event)).await.unwrap_err()
}

#[tokio::test]
async fn posts_a_signed_cloudevent_in_binary_mode() {
    let server = Server::ok().await;
    let config = WebhookConfig::new(server.url("/events/{type}?key={subject}"))
        .with_secret(secret())
        .with_header("Authorization", "Bearer t0ken");
    let publisher = publisher(config);
    let event = donor_secured();
    publisher.ready().await.unwrap();
    publisher.publish(&record(event.clone())).await.unwrap();

    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.path, "/events/DonorSecured?key=donor-42");
    assert_eq!(&request.body[..], event.data().get().as_bytes());
    let id = event.id().to_string();
    let expected = [
        ("ce-specversion", "1.0"),
        ("ce-id", id.as_str()),
        ("ce-type", "DonorSecured"),
        ("ce-source", "campaign-finance"),
        ("ce-subject", "donor-42"),
        ("ce-time", &event.time_rfc3339()),
        ("ce-dataschema", "urn:campaign:donor-secured:v2"),
        ("ce-correlationid", "pledge-drive-7"),
        (
            "ce-traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("ce-tenant", "acme"),
        ("content-type", "application/json"),
        ("authorization", "Bearer t0ken"),
        (WEBHOOK_ID, id.as_str()),
    ];
    for (name, value) in expected {
        assert_eq!(header(request, name), Some(value), "header {name}");
    }
    let timestamp: i64 = header(request, WEBHOOK_TIMESTAMP).unwrap().parse().unwrap();
    assert!((chrono::Utc::now().timestamp() - timestamp).abs() < 60);
    assert_eq!(
        header(request, WEBHOOK_SIGNATURE),
        Some(secret().sign(&id, timestamp, &request.body).as_str())
    );
    assert!(
        header(request, "user-agent")
            .unwrap()
            .starts_with("proclaim-webhook/")
    );
    assert_eq!(
        verify_and_decode(&secret(), &request.headers, &request.body).unwrap(),
        event
    );
}

#[tokio::test]
async fn structured_mode_round_trips() {
    let server = Server::ok().await;
    let config = WebhookConfig::new(server.url("/events"))
        .with_mode(ContentMode::Structured)
        .with_secret(secret());
    let event = donor_secured();
    publisher(config)
        .publish(&record(event.clone()))
        .await
        .unwrap();

    let request = &server.requests()[0];
    assert_eq!(
        header(request, "content-type"),
        Some(STRUCTURED_CONTENT_TYPE)
    );
    assert_eq!(&request.body[..], event.to_cloudevent_json().as_bytes());
    assert!(header(request, "ce-id").is_none(), "no ce-* headers");
    let back = verify_and_decode(&secret(), &request.headers, &request.body).unwrap();
    assert_eq!(back, event);
    assert_eq!(
        back.data().get(),
        event.data().get(),
        "data bytes unchanged"
    );
    assert_eq!(
        decode_request(&request.headers, &request.body).unwrap(),
        event
    );
}

#[tokio::test]
async fn a_500_then_200_is_transient_then_delivered() {
    let server = Server::start(|n| {
        if n == 0 {
            (StatusCode::INTERNAL_SERVER_ERROR, "database is down").into_response()
        } else {
            StatusCode::NO_CONTENT.into_response()
        }
    })
    .await;
    let publisher = publisher(WebhookConfig::new(server.url("/hook")).with_secret(secret()));
    let event = donor_secured();

    let err = fails(&publisher, event.clone()).await;
    assert!(err.is_transient(), "{}", err.full_message());
    assert_eq!(err.retry_after(), None);
    assert_eq!(
        err.to_string(),
        format!(
            "cannot deliver event {} to {}: the server answered 500 Internal Server Error: \
             \"database is down\"",
            event.id(),
            server.url("/hook")
        )
    );

    publisher.publish(&record(event.clone())).await.unwrap();
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    // Both attempts carry the event id, for the receiver's deduplication.
    for request in &requests {
        assert_eq!(
            header(request, WEBHOOK_ID),
            Some(event.id().to_string().as_str())
        );
    }
}

#[tokio::test]
async fn a_429_with_retry_after_is_transient_with_that_delay() {
    let server = Server::start(|n| {
        let mut response = (StatusCode::TOO_MANY_REQUESTS, "slow down").into_response();
        let value = match n {
            0 => "3".to_owned(),
            1 => httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(120)),
            _ => "86400".to_owned(),
        };
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from_str(&value).unwrap());
        response
    })
    .await;
    let config =
        WebhookConfig::new(server.url("/hook")).with_max_retry_after(Duration::from_secs(600));
    let publisher = publisher(config);

    let err = fails(&publisher, donor_secured()).await;
    assert!(err.is_transient());
    assert_eq!(err.retry_after(), Some(Duration::from_secs(3)));
    assert!(
        err.to_string()
            .contains("429 Too Many Requests: \"slow down\""),
        "{err}"
    );

    // An HTTP date: the time until then (the header has whole seconds).
    let err = fails(&publisher, donor_secured()).await;
    let delay = err.retry_after().unwrap();
    assert!(
        delay > Duration::from_secs(110) && delay <= Duration::from_secs(120),
        "{delay:?}"
    );

    // A day is cut to max_retry_after.
    let err = fails(&publisher, donor_secured()).await;
    assert_eq!(err.retry_after(), Some(Duration::from_secs(600)));
}

#[tokio::test]
async fn other_transient_statuses() {
    for status in [408, 502, 503, 504] {
        let server =
            Server::start(move |_| StatusCode::from_u16(status).unwrap().into_response()).await;
        let err = fails(
            &publisher(WebhookConfig::new(server.url("/"))),
            donor_secured(),
        )
        .await;
        assert!(err.is_transient(), "{status}: {err}");
        assert!(err.to_string().contains(&status.to_string()), "{err}");
    }
}

#[tokio::test]
async fn a_400_is_permanent_with_the_start_of_the_body() {
    let long = format!("invalid payload: {}", "x".repeat(1000));
    let body = long.clone();
    let server =
        Server::start(move |_| (StatusCode::BAD_REQUEST, body.clone()).into_response()).await;
    let publisher = publisher(WebhookConfig::new(server.url("/hook")).with_secret(secret()));
    let event = donor_secured();
    let err = fails(&publisher, event.clone()).await;
    assert!(!err.is_transient(), "{}", err.full_message());
    assert_eq!(err.retry_after(), None);
    let snippet = &long[..200];
    assert_eq!(
        err.to_string(),
        format!(
            "cannot deliver event {} to {}: the server answered 400 Bad Request: {snippet:?}…",
            event.id(),
            server.url("/hook")
        )
    );

    for status in [401, 403, 404, 410, 413, 422] {
        let server =
            Server::start(move |_| StatusCode::from_u16(status).unwrap().into_response()).await;
        let err = fails(&publisher_to(&server), donor_secured()).await;
        assert!(!err.is_transient(), "{status}: {err}");
    }
}

fn publisher_to(server: &Server) -> WebhookPublisher {
    publisher(WebhookConfig::new(server.url("/hook")))
}

#[tokio::test]
async fn a_redirect_is_permanent_names_the_location_and_is_not_followed() {
    let server = Server::start(|_| {
        (
            StatusCode::PERMANENT_REDIRECT,
            [("location", "https://user:pw@elsewhere.example/new-hook")],
        )
            .into_response()
    })
    .await;
    let err = fails(&publisher_to(&server), donor_secured()).await;
    assert!(!err.is_transient(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(
            "308 Permanent Redirect redirecting to https://***@elsewhere.example/new-hook"
        ),
        "{text}"
    );
    assert!(!text.contains("pw@"), "{text}");
    assert_eq!(server.requests().len(), 1, "not followed");
}

#[tokio::test]
async fn a_server_that_never_answers_is_transient_within_the_timeout() {
    // Accepts connections, answers nothing.
    let silent = SilentServer::start().await;
    let addr = silent.addr();
    let config = WebhookConfig::new(format!("http://{addr}/hook"))
        .with_timeout(Duration::from_millis(500))
        .with_connect_timeout(Duration::from_millis(500));
    let publisher = publisher(config);
    let started = Instant::now();
    let err = fails(&publisher, donor_secured()).await;
    let elapsed = started.elapsed();
    assert!(err.is_transient(), "{}", err.full_message());
    assert!(
        elapsed >= Duration::from_millis(500) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    assert!(
        err.to_string()
            .ends_with("no answer within the timeout of 500ms"),
        "{err}"
    );
}

#[tokio::test]
async fn a_refused_connection_is_transient() {
    let addr = free_addr();
    let publisher = publisher(WebhookConfig::new(format!("http://{addr}/hook")));
    let started = Instant::now();
    let err = fails(&publisher, donor_secured()).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(err.is_transient(), "{}", err.full_message());
    assert!(
        err.to_string()
            .ends_with("cannot connect: connection refused"),
        "{err}"
    );
}

#[tokio::test]
async fn keep_alive_connections_are_reused() {
    let server = Server::ok().await;
    let proxy = FaultProxy::start(server.addr).await.unwrap();
    let publisher = publisher(WebhookConfig::new(format!("http://{}/hook", proxy.addr())));
    for _ in 0..5 {
        publisher.publish(&record(donor_secured())).await.unwrap();
    }
    assert_eq!(server.requests().len(), 5);
    assert_eq!(proxy.active_connections(), 1);
}

/// A real request from the publisher, and the way to alter it.
async fn captured_request(mode: ContentMode) -> (Event, Captured) {
    let server = Server::ok().await;
    let config = WebhookConfig::new(server.url("/hook"))
        .with_mode(mode)
        .with_secret(secret());
    let event = donor_secured();
    publisher(config)
        .publish(&record(event.clone()))
        .await
        .unwrap();
    let request = server.requests().remove(0);
    (event, request)
}

#[tokio::test]
async fn verify_and_decode_rejects_bad_signatures_and_stale_timestamps() {
    let (event, request) = captured_request(ContentMode::Binary).await;
    let (headers, body) = (&request.headers, &request.body);
    assert_eq!(verify_and_decode(&secret(), headers, body).unwrap(), event);

    // The body was altered.
    let altered = [&body[..], b" "].concat();
    assert_eq!(
        verify_and_decode(&secret(), headers, &altered).unwrap_err(),
        VerifyError::Signature
    );
    // Another secret.
    let other = WebhookSecret::from_key(&[9; 32]).unwrap();
    assert_eq!(
        verify_and_decode(&other, headers, body).unwrap_err(),
        VerifyError::Signature
    );
    // A forged signature.
    let mut forged = headers.clone();
    forged.insert(
        WEBHOOK_SIGNATURE,
        HeaderValue::from_static("v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
    );
    assert_eq!(
        verify_and_decode(&secret(), &forged, body).unwrap_err(),
        VerifyError::Signature
    );
    // Not signed at all.
    let mut unsigned = headers.clone();
    unsigned.remove(WEBHOOK_SIGNATURE);
    assert_eq!(
        verify_and_decode(&secret(), &unsigned, body).unwrap_err(),
        VerifyError::Missing(WEBHOOK_SIGNATURE)
    );

    // A replay ten minutes later: validly signed, but stale.
    let id = event.id().to_string();
    let old = chrono::Utc::now().timestamp() - 600;
    let mut stale = headers.clone();
    stale.insert(
        WEBHOOK_TIMESTAMP,
        HeaderValue::from_str(&old.to_string()).unwrap(),
    );
    stale.insert(
        WEBHOOK_SIGNATURE,
        HeaderValue::from_str(&secret().sign(&id, old, body)).unwrap(),
    );
    let err = verify_and_decode(&secret(), &stale, body).unwrap_err();
    assert!(matches!(err, VerifyError::Timestamp { .. }), "{err:?}");
    assert!(
        err.to_string().contains("beyond the tolerance of 300s"),
        "{err}"
    );
    // A wider tolerance accepts it.
    let lenient = Verifier::new(secret()).with_tolerance(Duration::from_secs(900));
    assert_eq!(lenient.verify_and_decode(&stale, body).unwrap(), event);

    // The signed id must be the event's id.
    let mut swapped = headers.clone();
    let other_id = uuid::Uuid::now_v7().to_string();
    swapped.insert("ce-id", HeaderValue::from_str(&other_id).unwrap());
    let err = verify_and_decode(&secret(), &swapped, body).unwrap_err();
    assert!(matches!(err, VerifyError::IdMismatch { .. }), "{err:?}");

    // Documented limit of binary mode: the other ce-* headers are not signed.
    let mut retyped = headers.clone();
    retyped.insert("ce-type", HeaderValue::from_static("DonorRefunded"));
    let decoded = verify_and_decode(&secret(), &retyped, body).unwrap();
    assert_eq!(decoded.event_type(), "DonorRefunded");
}

#[tokio::test]
async fn structured_mode_signs_every_attribute() {
    let (event, request) = captured_request(ContentMode::Structured).await;
    let text = std::str::from_utf8(&request.body).unwrap();
    let retyped = text.replace("\"DonorSecured\"", "\"DonorRefunded\"");
    assert_ne!(retyped, text);
    assert_eq!(
        verify_and_decode(&secret(), &request.headers, retyped.as_bytes()).unwrap_err(),
        VerifyError::Signature
    );
    assert_eq!(
        verify_and_decode(&secret(), &request.headers, &request.body).unwrap(),
        event
    );
}

#[tokio::test]
async fn without_a_secret_requests_are_not_signed() {
    let server = Server::ok().await;
    let event = donor_secured();
    publisher(WebhookConfig::new(server.url("/hook")))
        .publish(&record(event.clone()))
        .await
        .unwrap();
    let request = &server.requests()[0];
    for name in [WEBHOOK_ID, WEBHOOK_TIMESTAMP, WEBHOOK_SIGNATURE] {
        assert!(header(request, name).is_none(), "{name}");
    }
    assert_eq!(
        decode_request(&request.headers, &request.body).unwrap(),
        event
    );
    assert_eq!(
        verify_and_decode(&secret(), &request.headers, &request.body).unwrap_err(),
        VerifyError::Missing(WEBHOOK_ID)
    );
}

#[tokio::test]
async fn decode_request_reports_what_is_wrong() {
    let (_, request) = captured_request(ContentMode::Binary).await;
    let mut headers = request.headers.clone();
    headers.remove("ce-source");
    let err = decode_request(&headers, &request.body).unwrap_err();
    assert_eq!(err.to_string(), "the message lacks the ce-source attribute");
    let mut batch = request.headers.clone();
    batch.insert(
        "content-type",
        HeaderValue::from_static("application/cloudevents-batch+json"),
    );
    assert_eq!(
        decode_request(&batch, b"[]").unwrap_err(),
        DecodeError::Batch
    );
}

#[tokio::test]
async fn attribute_values_outside_ascii_survive_the_headers() {
    let server = Server::ok().await;
    let event = Event::builder("DonorSecured")
        .subject("donor 42 \"ünï\" 100%")
        .source("campaign finance")
        .extension("note", "héllo wörld")
        .build()
        .unwrap();
    publisher(WebhookConfig::new(server.url("/hook")).with_secret(secret()))
        .publish(&record(event.clone()))
        .await
        .unwrap();
    let request = &server.requests()[0];
    assert_eq!(header(request, "ce-source"), Some("campaign%20finance"));
    assert_eq!(
        verify_and_decode(&secret(), &request.headers, &request.body).unwrap(),
        event
    );
}

#[tokio::test]
async fn an_event_whose_url_or_headers_cannot_be_formed_is_permanent() {
    let server = Server::ok().await;
    let by_subject = publisher(WebhookConfig::new(server.url("/hooks/{subject}")));
    let dots = Event::builder("DonorSecured")
        .subject("..")
        .build()
        .unwrap();
    let err = fails(&by_subject, dots.clone()).await;
    assert!(!err.is_transient());
    assert_eq!(
        err.to_string(),
        format!(
            "event {} cannot be posted: its subject \"..\" cannot be used in the webhook URL: \
             it is a dot segment, which would change the URL's path",
            dots.id()
        )
    );

    let odd_type = Event::builder("DonorSecured")
        .subject("k")
        .datacontenttype("application/json; note=\"ü\"")
        .build()
        .unwrap();
    let err = fails(&publisher_to(&server), odd_type).await;
    assert!(!err.is_transient(), "{err}");
    assert!(err.to_string().contains("content-type"), "{err}");
    assert!(server.requests().is_empty());
}

#[tokio::test]
async fn secrets_and_header_values_stay_out_of_debug_and_errors() {
    let server = Server::start(|_| StatusCode::UNAUTHORIZED.into_response()).await;
    let config = WebhookConfig::new(server.url("/hook"))
        .with_secret(secret())
        .with_header("Authorization", "Bearer t0ken-value");
    let publisher = publisher(config.clone());
    let err = fails(&publisher, donor_secured()).await;
    let shown = format!(
        "{config:?} {publisher:?} {:?} {} {err:?}",
        config.secret,
        err.full_message()
    );
    let key = SECRET.trim_start_matches("whsec_");
    assert!(!shown.contains(key), "{shown}");
    assert!(!shown.contains("t0ken-value"), "{shown}");
    assert!(shown.contains("401 Unauthorized"), "{shown}");
    // The header still reached the server.
    assert_eq!(
        header(&server.requests()[0], "authorization"),
        Some("Bearer t0ken-value")
    );
}

#[tokio::test]
async fn an_invalid_config_is_rejected() {
    let err = WebhookPublisher::new(WebhookConfig::new("http://127.0.0.1:1/{kind}")).unwrap_err();
    assert!(matches!(err, WebhookError::Config(_)), "{err:?}");
    let err = WebhookPublisher::new(WebhookConfig::default()).unwrap_err();
    assert!(err.to_string().contains("url \"\" is empty"), "{err}");
}
