//! `SupabaseStore` against an in-process fake of Supabase Storage, over real HTTP: the
//! request shapes, the error bodies of `shared/ref/supabase.md`, and transport faults.

#[path = "support/fake_supabase.rs"]
mod fake_supabase;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fake_supabase::{BUCKET, FakeSupabase, Fault};
use headshot_host::config::SupabaseStorageConfig;
use headshot_host::storage::{ImageStore, ObjectKey, StorageError, SupabaseStore, UploadOutcome};
use headshot_plugin_sdk::rules::retry::ErrorKind;

const TTL: Duration = Duration::from_secs(600);

fn config(url: &str, key: &str) -> SupabaseStorageConfig {
    SupabaseStorageConfig {
        url: url.into(),
        service_key: key.into(),
        bucket: BUCKET.into(),
        timeout_ms: 2_000,
        cache_max_age_secs: 3600,
    }
}

fn store(fake: &FakeSupabase) -> SupabaseStore {
    SupabaseStore::new(&config(&fake.base_url(), fake.jwt())).unwrap()
}

fn key(job: &str, n: u32) -> ObjectKey {
    ObjectKey::new("user-1", job, n, 64).unwrap()
}

fn png(n: u8) -> Vec<u8> {
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    bytes.extend(std::iter::repeat_n(n, 64));
    bytes
}

async fn download(url: &str) -> (u16, Vec<u8>) {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let resp = client.get(url).send().await.unwrap();
    (resp.status().as_u16(), resp.bytes().await.unwrap().to_vec())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test]
async fn upload_sign_download_round_trip() {
    let fake = FakeSupabase::start().await;
    let s = store(&fake);
    let k = key("job-1", 0);
    assert_eq!(s.upload(&k, png(1)).await.unwrap(), UploadOutcome::Created);

    let stored = fake.object(BUCKET, "user-1/job-1/0.png").unwrap();
    assert_eq!(stored.bytes, png(1));
    assert_eq!(stored.content_type, "image/png");
    assert_eq!(stored.cache_control, "max-age=3600");
    let req = &fake.requests()[0];
    assert_eq!(req.method, "POST");
    assert_eq!(req.path, "/storage/v1/object/headshots/user-1/job-1/0.png");
    assert_eq!(req.x_upsert.as_deref(), Some("false"));
    assert_eq!(
        req.authorization.as_deref(),
        Some(format!("Bearer {}", fake.jwt()).as_str())
    );
    assert_eq!(req.apikey.as_deref(), Some(fake.jwt()));

    let before = now_ms();
    let urls = s.sign(std::slice::from_ref(&k), TTL).await.unwrap();
    assert_eq!(urls.len(), 1);
    let prefix = format!(
        "{}/object/sign/headshots/user-1/job-1/0.png?token=",
        fake.storage_url()
    );
    assert!(urls[0].url.starts_with(&prefix), "{}", urls[0].url);
    let ttl_ms = TTL.as_millis() as u64;
    assert!(urls[0].expires_at_ms >= before + ttl_ms && urls[0].expires_at_ms <= now_ms() + ttl_ms);
    assert_eq!(
        fake.requests()[1].path,
        "/storage/v1/object/sign/headshots/user-1/job-1/0.png"
    );

    let (status, bytes) = download(&urls[0].url).await;
    assert_eq!((status, bytes), (200, png(1)));
    s.health().await.unwrap();
}

#[tokio::test]
async fn signed_urls_are_checked_by_the_fake() {
    // Guards the fake itself: a download must present the token issued for that object.
    let fake = FakeSupabase::start().await;
    let s = store(&fake);
    for n in 0..2 {
        s.upload(&key("j", n), png(n as u8)).await.unwrap();
    }
    let url = s.sign(&[key("j", 0)], TTL).await.unwrap().remove(0).url;
    let (status, body) = download(&format!("{url}0")).await;
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("InvalidJWT"));
    let other = url.replace("/0.png?", "/1.png?");
    let (status, body) = download(&other).await;
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("InvalidSignature"));
    let (status, _) = download(url.split('?').next().unwrap()).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn duplicate_upload_is_already_existed_and_stores_nothing() {
    let fake = FakeSupabase::start().await;
    let s = store(&fake);
    let k = key("job-1", 0);
    assert_eq!(s.upload(&k, png(1)).await.unwrap(), UploadOutcome::Created);
    assert_eq!(
        s.upload(&k, png(2)).await.unwrap(),
        UploadOutcome::AlreadyExisted
    );
    assert_eq!(fake.uploads_received(), 2);
    assert_eq!(fake.objects_stored(), 1);
    assert_eq!(
        fake.object(BUCKET, "user-1/job-1/0.png").unwrap().bytes,
        png(1),
        "never overwritten"
    );
}

#[tokio::test]
async fn wrong_keys_are_unauthorized() {
    let fake = FakeSupabase::start().await;
    let other_jwt = "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIn0.b3RoZXI";
    let s = SupabaseStore::new(&config(&fake.base_url(), other_jwt)).unwrap();
    let err = s.upload(&key("j", 0), png(0)).await.unwrap_err();
    match &err {
        StorageError::Unauthorized {
            status: 403,
            message,
        } => {
            assert!(
                message.contains("signature verification failed"),
                "{message}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        err.kind(),
        ErrorKind::ClientError,
        "a bad key is not retried"
    );
    assert!(matches!(
        s.health().await,
        Err(StorageError::Unauthorized { status: 403, .. })
    ));
    assert!(matches!(
        s.sign(&[key("j", 0)], TTL).await,
        Err(StorageError::Unauthorized { .. })
    ));

    // An unknown sb_secret_ key is refused by the gateway with a bare 401.
    let s = SupabaseStore::new(&config(&fake.base_url(), "sb_secret_not_the_right_one")).unwrap();
    let err = s.upload(&key("j", 0), png(0)).await.unwrap_err();
    assert!(
        matches!(&err, StorageError::Unauthorized { status: 401, message } if message.contains("Invalid API key")),
        "{err:?}"
    );
    assert_eq!(fake.objects_stored(), 0);
}

#[tokio::test]
async fn sb_secret_key_is_sent_in_apikey_only() {
    let fake = FakeSupabase::start().await;
    let s = SupabaseStore::new(&config(&fake.base_url(), fake.secret_key())).unwrap();
    assert_eq!(
        s.upload(&key("j", 0), png(0)).await.unwrap(),
        UploadOutcome::Created
    );
    let urls = s.sign(&[key("j", 0)], TTL).await.unwrap();
    assert_eq!(download(&urls[0].url).await, (200, png(0)));
    s.health().await.unwrap();
    for req in fake.requests().iter().filter(|r| r.method == "POST") {
        assert_eq!(
            req.apikey.as_deref(),
            Some(fake.secret_key()),
            "{}",
            req.path
        );
        assert_eq!(
            req.authorization, None,
            "an sb_secret_ key is not a JWT: {}",
            req.path
        );
    }
}

#[tokio::test]
async fn missing_bucket_is_a_client_error_naming_it() {
    let fake = FakeSupabase::start().await;
    let mut cfg = config(&fake.base_url(), fake.jwt());
    cfg.bucket = "no-such-bucket".into();
    let s = SupabaseStore::new(&cfg).unwrap();
    for err in [
        s.upload(&key("j", 0), png(0)).await.unwrap_err(),
        s.health().await.unwrap_err(),
    ] {
        match &err {
            StorageError::Client {
                status: 404,
                code: Some(code),
                message,
            } => {
                assert_eq!(code, "NoSuchBucket");
                assert!(message.contains("no-such-bucket"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(err.kind(), ErrorKind::ClientError);
    }
    // Signing in a missing bucket answers NoSuchKey, as the real server does.
    let err = s.sign(&[key("j", 0)], TTL).await.unwrap_err();
    assert!(
        matches!(&err, StorageError::Client { status: 404, code: Some(c), message } if c == "NoSuchKey" && message.contains("no-such-bucket")),
        "{err:?}"
    );
}

#[tokio::test]
async fn too_large_is_a_client_error() {
    let fake = FakeSupabase::start().await;
    fake.create_bucket("small", Some(16));
    let mut cfg = config(&fake.base_url(), fake.jwt());
    cfg.bucket = "small".into();
    let s = SupabaseStore::new(&cfg).unwrap();
    let err = s.upload(&key("j", 0), png(0)).await.unwrap_err();
    assert!(
        matches!(&err, StorageError::Client { status: 413, code: Some(c), .. } if c == "EntityTooLarge"),
        "{err:?}"
    );
    assert_eq!(fake.objects_stored(), 0);
}

#[tokio::test]
async fn server_500_json_is_a_server_error_then_recovers() {
    let fake = FakeSupabase::start().await;
    let s = store(&fake);
    fake.fail_next(1, Fault::Status500Json);
    let err = s.upload(&key("j", 0), png(0)).await.unwrap_err();
    assert!(
        matches!(&err, StorageError::Server { status: 500, code: Some(c), .. } if c == "InternalError"),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::ServerError);
    assert_eq!(fake.objects_stored(), 0);
    assert_eq!(
        s.upload(&key("j", 0), png(0)).await.unwrap(),
        UploadOutcome::Created
    );
}

#[tokio::test]
async fn gateway_502_html_is_a_server_error_with_a_snippet() {
    let fake = FakeSupabase::start().await;
    let s = store(&fake);
    fake.fail_next(1, Fault::Gateway502Html);
    let err = s.health().await.unwrap_err();
    match &err {
        StorageError::Server {
            status: 502,
            code: None,
            message,
        } => {
            assert!(message.contains("502 Bad Gateway"), "{message}");
            assert!(message.chars().count() <= 301, "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err.status(), Some(502));
    s.health().await.unwrap();
}

#[tokio::test]
async fn slow_answer_times_out_and_a_retry_stores_once() {
    let fake = FakeSupabase::start().await;
    let mut cfg = config(&fake.base_url(), fake.jwt());
    cfg.timeout_ms = 200;
    let s = SupabaseStore::new(&cfg).unwrap();
    fake.fail_next(1, Fault::Slow(Duration::from_millis(800)));
    let started = std::time::Instant::now();
    let err = s.upload(&key("j", 0), png(0)).await.unwrap_err();
    assert_eq!(err, StorageError::Timeout(Duration::from_millis(200)));
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(
        started.elapsed() < Duration::from_millis(700),
        "{:?}",
        started.elapsed()
    );
    // The slow request may still complete on the server; the retry then finds the object.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let outcome = s.upload(&key("j", 0), png(0)).await.unwrap();
    assert!(matches!(
        outcome,
        UploadOutcome::Created | UploadOutcome::AlreadyExisted
    ));
    assert_eq!(fake.objects_stored(), 1, "no image stored twice");
}

#[tokio::test]
async fn closed_port_is_a_connection_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let s = SupabaseStore::new(&config(
        &format!("http://127.0.0.1:{port}"),
        fake_supabase::SERVICE_JWT,
    ))
    .unwrap();
    let err = s.upload(&key("j", 0), png(0)).await.unwrap_err();
    assert!(matches!(err, StorageError::Connection(_)), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Connection);
}

#[tokio::test]
async fn dropped_connection_is_a_connection_error_then_recovers() {
    let fake = FakeSupabase::start().await;
    let s = store(&fake);
    fake.fail_next(1, Fault::Refuse);
    let err = s.upload(&key("j", 0), png(0)).await.unwrap_err();
    assert!(matches!(err, StorageError::Connection(_)), "{err:?}");
    assert_eq!(fake.pending_faults(), 0);
    assert_eq!(fake.uploads_received(), 0);
    assert_eq!(
        s.upload(&key("j", 0), png(0)).await.unwrap(),
        UploadOutcome::Created
    );
}

#[tokio::test]
async fn rate_limit_carries_retry_after() {
    let fake = FakeSupabase::start().await;
    let s = store(&fake);
    fake.fail_next(
        2,
        Fault::Status429 {
            retry_after_secs: 7,
        },
    );
    for _ in 0..2 {
        let err = s.upload(&key("j", 0), png(0)).await.unwrap_err();
        assert!(
            matches!(
                &err,
                StorageError::RateLimited {
                    retry_after_ms: Some(7000),
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.kind(), ErrorKind::RateLimited);
        assert_eq!(err.retry_after_ms(), Some(7000));
        assert_eq!(err.status(), Some(429));
    }
    assert_eq!(
        s.upload(&key("j", 0), png(0)).await.unwrap(),
        UploadOutcome::Created
    );
}

#[tokio::test]
async fn base_url_with_and_without_storage_path() {
    let fake = FakeSupabase::start().await;
    let variants = [
        fake.base_url(),
        format!("{}/", fake.base_url()),
        fake.storage_url(),
        format!("{}/", fake.storage_url()),
    ];
    for (n, url) in variants.iter().enumerate() {
        let s = SupabaseStore::new(&config(url, fake.jwt())).unwrap();
        assert_eq!(s.base_url(), fake.storage_url(), "{url}");
        s.health().await.unwrap();
        let k = key("base", n as u32);
        assert_eq!(
            s.upload(&k, png(n as u8)).await.unwrap(),
            UploadOutcome::Created,
            "{url}"
        );
        let signed = s.sign(&[k], TTL).await.unwrap();
        assert_eq!(download(&signed[0].url).await, (200, png(n as u8)), "{url}");
    }
    // A path that is not Storage is used as given, and the 404 says to check the URL.
    let s =
        SupabaseStore::new(&config(&format!("{}/rest/v1", fake.base_url()), fake.jwt())).unwrap();
    let err = s.health().await.unwrap_err();
    assert!(
        matches!(&err, StorageError::Client { status: 404, message, .. } if message.contains("storage.supabase.url")),
        "{err:?}"
    );
}

#[tokio::test]
async fn batch_signing_keeps_order_in_one_request() {
    let fake = FakeSupabase::start().await;
    let s = store(&fake);
    let keys: Vec<_> = (0..4).map(|n| key("batch", n)).collect();
    for (n, k) in keys.iter().enumerate() {
        s.upload(k, png(n as u8)).await.unwrap();
    }
    let requests_before = fake.requests().len();
    let mut reversed = keys.clone();
    reversed.reverse();
    let urls = s.sign(&reversed, TTL).await.unwrap();
    let sign_requests: Vec<_> = fake.requests().into_iter().skip(requests_before).collect();
    assert_eq!(sign_requests.len(), 1, "one call per job");
    assert_eq!(sign_requests[0].path, "/storage/v1/object/sign/headshots");
    assert_eq!(urls.len(), 4);
    for (url, k) in urls.iter().zip(&reversed) {
        assert!(
            url.url.contains(&format!("/{}?token=", k.path())),
            "{}",
            url.url
        );
        assert_eq!(download(&url.url).await, (200, png(k.index() as u8)));
    }
    let requests_before = fake.requests().len();
    assert!(s.sign(&[], TTL).await.unwrap().is_empty());
    assert_eq!(
        fake.requests().len(),
        requests_before,
        "nothing to sign, no request"
    );

    // One missing object fails the batch, naming it.
    let err = s
        .sign(&[key("batch", 0), key("batch", 9)], TTL)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StorageError::Client { status: 404, message, .. } if message.contains("user-1/batch/9.png")),
        "{err:?}"
    );
}

#[tokio::test]
async fn single_sign_of_a_missing_object_is_a_client_error() {
    let fake = FakeSupabase::start().await;
    let s = store(&fake);
    let err = s.sign(&[key("j", 5)], TTL).await.unwrap_err();
    assert!(
        matches!(&err, StorageError::Client { status: 404, code: Some(c), message } if c == "NoSuchKey" && message.contains("user-1/j/5.png")),
        "{err:?}"
    );
}

#[tokio::test]
async fn bucket_needing_percent_encoding_round_trips() {
    let fake = FakeSupabase::start().await;
    fake.create_bucket("team photos", None);
    let mut cfg = config(&fake.storage_url(), fake.jwt());
    cfg.bucket = "team photos".into();
    let s = SupabaseStore::new(&cfg).unwrap();
    s.health().await.unwrap();
    let keys = [key("enc", 0), key("enc", 1)];
    for k in &keys {
        assert_eq!(s.upload(k, png(9)).await.unwrap(), UploadOutcome::Created);
    }
    assert_eq!(
        fake.requests()[1].path,
        "/storage/v1/object/team%20photos/user-1/enc/0.png"
    );
    for urls in [
        s.sign(&keys[..1], TTL).await.unwrap(),
        s.sign(&keys, TTL).await.unwrap(),
    ] {
        for u in urls {
            assert!(
                u.url.contains("/object/sign/team%20photos/user-1/enc/"),
                "{}",
                u.url
            );
            assert_eq!(download(&u.url).await, (200, png(9)));
        }
    }
}
