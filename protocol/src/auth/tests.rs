//! Test keys in `testdata/` were generated with openssl for these tests only.

use super::*;
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::json;

const NOW: u64 = 1_800_000_000;
const SECRET: &[u8] = b"test-secret-test-secret-test-secret";
const RSA_PRIVATE: &str = include_str!("testdata/rsa_private.pem");
const RSA_PUBLIC: &str = include_str!("testdata/rsa_public.pem");
const EC_PRIVATE: &str = include_str!("testdata/ec_private.pem");
const EC_PUBLIC: &str = include_str!("testdata/ec_public.pem");
const JWKS: &str = include_str!("testdata/jwks.json");

fn claims() -> serde_json::Value {
    json!({"sub": "ana", "teams": ["t1", "t2"], "admin_of": ["t1"], "scope": "publish locks bogus", "exp": NOW + 60})
}

fn hs(claims: &serde_json::Value, secret: &[u8]) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn hs_auth() -> Authenticator {
    Authenticator::new(&AuthConfig {
        hs256_secret: Some(SECRET.to_vec()),
        ..AuthConfig::default()
    })
    .unwrap()
}

#[test]
fn valid_hs256_token() {
    let p = hs_auth().verify(&hs(&claims(), SECRET), NOW).unwrap();
    assert_eq!(p.sub, "ana");
    assert!(p.is_member("t2") && p.is_admin("t1") && !p.is_admin("t2"));
    assert_eq!(
        p.scopes,
        [Scope::Publish, Scope::Locks].into_iter().collect()
    );
    assert_eq!(p.exp, NOW + 60);
}

#[test]
fn refusals() {
    let auth = hs_auth();
    let check = |claims: serde_json::Value, expect: AuthError| {
        assert_eq!(auth.verify(&hs(&claims, SECRET), NOW), Err(expect));
    };
    let mut c = claims();
    c["exp"] = json!(NOW);
    check(c, AuthError::Expired);
    let mut c = claims();
    c["nbf"] = json!(NOW + 10);
    check(c, AuthError::NotYetValid);
    let mut c = claims();
    c.as_object_mut().unwrap().remove("exp");
    check(c, AuthError::NoExpiry);
    let mut c = claims();
    c["teams"] = json!("t1");
    assert!(matches!(
        auth.verify(&hs(&c, SECRET), NOW),
        Err(AuthError::Claims(_))
    ));

    assert_eq!(
        auth.verify(&hs(&claims(), b"other-secret"), NOW),
        Err(AuthError::Signature)
    );
    assert_eq!(auth.verify("not.a.token", NOW), Err(AuthError::Malformed));
    assert_eq!(auth.verify("", NOW), Err(AuthError::Malformed));
}

#[test]
fn alg_none_is_refused() {
    use base64::Engine as _;
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let token = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims())
    );
    assert!(hs_auth().verify(&token, NOW).is_err());
}

#[test]
fn algorithm_confusion_is_refused() {
    // An attacker signs HS256 with the server's public key as the HMAC secret.
    let forged = hs(&claims(), RSA_PUBLIC.as_bytes());
    let public_only = Authenticator::new(&AuthConfig {
        public_keys: Some(RSA_PUBLIC.to_owned()),
        ..AuthConfig::default()
    })
    .unwrap();
    assert_eq!(
        public_only.verify(&forged, NOW),
        Err(AuthError::Algorithm("HS256".into()))
    );
    let both = Authenticator::new(&AuthConfig {
        hs256_secret: Some(SECRET.to_vec()),
        public_keys: Some(RSA_PUBLIC.to_owned()),
        ..AuthConfig::default()
    })
    .unwrap();
    assert_eq!(both.verify(&forged, NOW), Err(AuthError::Signature));
    // And an RS256 token is refused by an HS256-only server.
    let rs = encode(
        &Header::new(Algorithm::RS256),
        &claims(),
        &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(
        hs_auth().verify(&rs, NOW),
        Err(AuthError::Algorithm("RS256".into()))
    );
    assert_eq!(both.verify(&rs, NOW).unwrap().sub, "ana");
}

#[test]
fn public_keys_from_pem_and_jwks() {
    let rs_key = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
    let es_key = EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap();
    let es = encode(&Header::new(Algorithm::ES256), &claims(), &es_key).unwrap();
    let ec_auth = Authenticator::new(&AuthConfig {
        public_keys: Some(EC_PUBLIC.to_owned()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(ec_auth.verify(&es, NOW).unwrap().sub, "ana");

    let jwks = Authenticator::new(&AuthConfig {
        public_keys: Some(JWKS.to_owned()),
        ..Default::default()
    })
    .unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("k1".into());
    assert_eq!(
        jwks.verify(&encode(&header, &claims(), &rs_key).unwrap(), NOW)
            .unwrap()
            .sub,
        "ana"
    );
    header.kid = Some("k2".into());
    assert_eq!(
        jwks.verify(&encode(&header, &claims(), &rs_key).unwrap(), NOW),
        Err(AuthError::UnknownKey)
    );
    assert!(matches!(
        Authenticator::new(&AuthConfig {
            public_keys: Some("garbage".into()),
            ..Default::default()
        }),
        Err(KeyError::Invalid(_))
    ));
    assert!(matches!(
        Authenticator::new(&AuthConfig::default()),
        Err(KeyError::None)
    ));
}

#[test]
fn issuer_and_audience() {
    let auth = Authenticator::new(&AuthConfig {
        hs256_secret: Some(SECRET.to_vec()),
        issuer: Some("platform".into()),
        audience: Some("lockstep".into()),
        ..AuthConfig::default()
    })
    .unwrap();
    let with = |iss: Option<&str>, aud: Option<serde_json::Value>| {
        let mut c = claims();
        if let Some(iss) = iss {
            c["iss"] = json!(iss);
        }
        if let Some(aud) = aud {
            c["aud"] = aud;
        }
        auth.verify(&hs(&c, SECRET), NOW)
    };
    assert!(with(Some("platform"), Some(json!("lockstep"))).is_ok());
    assert!(with(Some("platform"), Some(json!(["x", "lockstep"]))).is_ok());
    assert_eq!(with(None, Some(json!("lockstep"))), Err(AuthError::Issuer));
    assert_eq!(
        with(Some("evil"), Some(json!("lockstep"))),
        Err(AuthError::Issuer)
    );
    assert_eq!(with(Some("platform"), None), Err(AuthError::Audience));
    assert_eq!(
        with(Some("platform"), Some(json!("other"))),
        Err(AuthError::Audience)
    );
}

#[test]
fn subscribe_and_publish_rules() {
    let p = hs_auth().verify(&hs(&claims(), SECRET), NOW).unwrap();
    let t = |s: &str| Topic::parse(s).unwrap();
    assert!(p.can_subscribe(&t("/user/ana")).is_ok());
    assert!(p.can_subscribe(&t("/team/t2")).is_ok());
    assert!(p.can_subscribe(&t("/global")).is_ok());
    assert_eq!(
        p.can_subscribe(&t("/user/bob")),
        Err(Forbidden::OtherUser("/user/bob".into()))
    );
    assert_eq!(
        p.can_subscribe(&t("/team/t9")),
        Err(Forbidden::NotMember("/team/t9".into()))
    );

    assert!(p.can_publish(&t("/team/t1")).is_ok());
    assert!(p.can_publish(&t("/user/ana")).is_ok());
    assert!(p.can_publish(&t("/team/t9")).is_err());
    assert!(p.can_publish(&t("/user/bob")).is_err());
    assert!(p.can_publish(&t("/global")).is_err());

    let mut c = claims();
    c["scope"] = json!("publish:global");
    let global = hs_auth().verify(&hs(&c, SECRET), NOW).unwrap();
    assert!(global.can_publish(&t("/global")).is_ok());
    assert!(global.can_publish(&t("/user/bob")).is_ok());
    // Team topics still need `publish` and membership.
    assert!(global.can_publish(&t("/team/t1")).is_err());

    let mut c = claims();
    c["scope"] = json!("");
    let none = hs_auth().verify(&hs(&c, SECRET), NOW).unwrap();
    assert_eq!(
        none.can_publish(&t("/team/t1")).unwrap_err().to_string(),
        "publishing to /team/t1 needs the 'publish' scope"
    );
}

#[test]
fn sub_must_name_a_user_topic() {
    let auth = hs_auth();
    for sub in ["auth0|123", "ana@example.com", "", "..", &"a".repeat(129)] {
        let mut c = claims();
        c["sub"] = json!(sub);
        assert!(
            matches!(auth.verify(&hs(&c, SECRET), NOW), Err(AuthError::Claims(m)) if m.contains("user topic")),
            "{sub:?} was accepted"
        );
    }
}

#[test]
fn absurd_expiries_are_refused_and_rates_are_read() {
    let auth = hs_auth();
    let mut c = claims();
    // Near 2^63: once panicked the session that added it to its clock.
    c["exp"] = json!(i64::MAX as u64 - 1);
    assert!(matches!(
        auth.verify(&hs(&c, SECRET), NOW),
        Err(AuthError::Claims(_))
    ));
    let mut c = claims();
    c["exp"] = json!(MAX_EXP);
    c["publish_rate"] = json!(5000);
    let p = auth.verify(&hs(&c, SECRET), NOW).unwrap();
    assert_eq!((p.exp, p.publish_rate), (MAX_EXP, Some(5000)));
    assert_eq!(
        auth.verify(&hs(&claims(), SECRET), NOW)
            .unwrap()
            .publish_rate,
        None
    );
}

#[test]
fn a_token_without_kid_is_tried_against_every_key_and_keys_reload() {
    const RSA2_PRIVATE: &str = include_str!("testdata/rsa2_private.pem");
    let second = EncodingKey::from_rsa_pem(RSA2_PRIVATE.as_bytes()).unwrap();
    let first = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
    let rotation = Authenticator::new(&AuthConfig {
        public_keys: Some(include_str!("testdata/jwks_rotation.json").to_owned()),
        ..AuthConfig::default()
    })
    .unwrap();
    // No `kid`: both keys of the set are RS256 and both must be tried.
    for key in [&first, &second] {
        let token = encode(&Header::new(Algorithm::RS256), &claims(), key).unwrap();
        assert_eq!(rotation.verify(&token, NOW).unwrap().sub, "ana");
    }
    // A key outside the set still fails with a signature error.
    let pem_only = Authenticator::new(&AuthConfig {
        public_keys: Some(RSA_PUBLIC.to_owned()),
        ..AuthConfig::default()
    })
    .unwrap();
    let token = encode(&Header::new(Algorithm::RS256), &claims(), &second).unwrap();
    assert_eq!(pem_only.verify(&token, NOW), Err(AuthError::Signature));
    // A reload takes effect at once; a broken file keeps the keys in use.
    assert_eq!(
        pem_only.reload_public_keys(include_str!("testdata/jwks_rotation.json")),
        Ok(2)
    );
    assert_eq!(pem_only.verify(&token, NOW).unwrap().sub, "ana");
    assert!(pem_only.reload_public_keys("garbage").is_err());
    assert_eq!(pem_only.public_keys(), 2);
}
