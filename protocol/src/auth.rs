//! Who a token says a caller is, and what that lets it do (DESIGN §3).
//!
//! [`Authenticator::verify`] checks a JWT and yields a [`Principal`]; the `can_*` methods of
//! [`Principal`] are the subscribe and publish rules. Both the hub and the API use this module,
//! so a rule can never differ between STOMP and HTTP. The clock is an argument (`now`, seconds
//! since the Unix epoch), as everywhere in this crate.

use crate::topic::{Topic, TopicKind};
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use std::collections::HashSet;
use thiserror::Error;

/// A scope a token may carry in its space-separated `scope` claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Publish to your teams' topics and your own user topic.
    Publish,
    /// Publish platform-wide: `/global` and any user's topic.
    PublishGlobal,
    /// Take and manage edit locks.
    Locks,
    /// Get presigned object URLs.
    Presign,
    /// Act on other users' connections: disconnect them, end their subscriptions, list them
    /// (the control API, DESIGN §15). For the platform's backend, never for a browser.
    Control,
}

impl Scope {
    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "publish" => Some(Scope::Publish),
            "publish:global" => Some(Scope::PublishGlobal),
            "locks" => Some(Scope::Locks),
            "presign" => Some(Scope::Presign),
            "control" => Some(Scope::Control),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Scope::Publish => "publish",
            Scope::PublishGlobal => "publish:global",
            Scope::Locks => "locks",
            Scope::Presign => "presign",
            Scope::Control => "control",
        }
    }
}

/// The claims Lockstep reads. Others are ignored.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    teams: Vec<String>,
    #[serde(default)]
    admin_of: Vec<String>,
    #[serde(default)]
    scope: String,
    exp: Option<u64>,
    nbf: Option<u64>,
    iat: Option<u64>,
    /// A service token's own publish rate (events per second), bounded by configuration.
    publish_rate: Option<u32>,
}

/// The latest `exp` accepted: the end of the year 9999. Anything later is not a real expiry
/// (and would overflow the clocks it is added to).
pub const MAX_EXP: u64 = 253_402_300_799;

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub sub: String,
    pub teams: HashSet<String>,
    pub admin_of: HashSet<String>,
    pub scopes: HashSet<Scope>,
    /// `exp`, seconds since the Unix epoch (leeway included), at most [`MAX_EXP`].
    pub exp: u64,
    /// When the token was issued, seconds since the Unix epoch: its `iat`, else its `nbf`,
    /// else `None` (a token that does not say is taken as older than any revocation).
    pub issued_at: Option<u64>,
    /// The token's `publish_rate` claim: events per second this caller may publish, where the
    /// configuration allows tokens to ask for their own rate. `None`: the configured default.
    pub publish_rate: Option<u32>,
}

/// Why a token was refused. The messages are safe to show a client.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AuthError {
    #[error(
        "no token: send it as passcode or Authorization: Bearer in CONNECT, or as access_token"
    )]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("token algorithm {0} is not accepted")]
    Algorithm(String),
    #[error("invalid token signature")]
    Signature,
    #[error("no key matches the token's kid")]
    UnknownKey,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token has no exp claim")]
    NoExpiry,
    #[error("token has the wrong issuer")]
    Issuer,
    #[error("token has the wrong audience")]
    Audience,
    #[error("token claims are invalid: {0}")]
    Claims(String),
}

/// Why an authenticated caller may not do something. Messages name the destination.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Forbidden {
    #[error("{0} is another user's topic")]
    OtherUser(String),
    #[error("{0}: not a member of this team")]
    NotMember(String),
    #[error("publishing to {topic} needs the '{scope}' scope")]
    MissingScope { topic: String, scope: &'static str },
    #[error("needs the '{0}' scope")]
    Scope(&'static str),
    #[error("team {0}: admin rights needed")]
    NotAdmin(String),
}

impl Principal {
    pub fn has_scope(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    pub fn is_member(&self, team: &str) -> bool {
        self.teams.contains(team)
    }

    pub fn is_admin(&self, team: &str) -> bool {
        self.admin_of.contains(team)
    }

    /// Subscribe rule: your own user topic, your teams and their items, and `/global`.
    ///
    /// # Errors
    ///
    /// [`Forbidden`] naming the topic.
    pub fn can_subscribe(&self, topic: &Topic) -> Result<(), Forbidden> {
        match topic.kind() {
            TopicKind::Global => Ok(()),
            TopicKind::User if topic.id() == Some(self.sub.as_str()) => Ok(()),
            TopicKind::User => Err(Forbidden::OtherUser(topic.to_string())),
            TopicKind::Team | TopicKind::Item => self.member_of_team(topic),
        }
    }

    /// Publish rule: `publish` and membership of the team (for its items too), or your own user topic;
    /// `publish:global` for `/global` and for other users' topics (what a platform backend
    /// assigning tasks needs).
    ///
    /// # Errors
    ///
    /// [`Forbidden`] naming the topic and what is missing.
    pub fn can_publish(&self, topic: &Topic) -> Result<(), Forbidden> {
        let needs = |scope: Scope| {
            if self.has_scope(scope) {
                Ok(())
            } else {
                Err(Forbidden::MissingScope {
                    topic: topic.to_string(),
                    scope: scope.as_str(),
                })
            }
        };
        match topic.kind() {
            TopicKind::Global => needs(Scope::PublishGlobal),
            TopicKind::User if topic.id() == Some(self.sub.as_str()) => needs(Scope::Publish),
            TopicKind::User => needs(Scope::PublishGlobal),
            TopicKind::Team | TopicKind::Item => {
                needs(Scope::Publish)?;
                self.member_of_team(topic)
            }
        }
    }

    /// Membership of the team a team or item topic belongs to.
    fn member_of_team(&self, topic: &Topic) -> Result<(), Forbidden> {
        match topic.team_id() {
            Some(team) if self.is_member(team) => Ok(()),
            _ => Err(Forbidden::NotMember(topic.to_string())),
        }
    }
}

/// Where verification keys come from.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// HS256 shared secret.
    pub hs256_secret: Option<Vec<u8>>,
    /// Contents of a PEM (one public key) or JWKS file for RS256/ES256.
    pub public_keys: Option<String>,
    /// Required `iss`.
    pub issuer: Option<String>,
    /// Required `aud`.
    pub audience: Option<String>,
    /// Seconds of clock skew tolerated on `exp` and `nbf`.
    pub leeway_secs: u64,
}

/// Why an [`AuthConfig`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyError {
    #[error("no verification key: configure an HS256 secret or public keys")]
    None,
    #[error("public keys: {0}")]
    Invalid(String),
}

struct PublicKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish()
    }
}

/// Verifies tokens. Built once at start; cheap to share. Its public keys can be replaced
/// while it is in use ([`Authenticator::reload_public_keys`]), so a JWKS rotation needs no
/// restart.
pub struct Authenticator {
    hs256: Option<DecodingKey>,
    /// Read on every verification, written on a reload. `std`'s lock: never held across an
    /// `.await` (this crate has none), and writers are rare.
    public: std::sync::RwLock<Vec<PublicKey>>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: u64,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Authenticator")
            .field("hs256", &self.hs256.is_some())
            .field("public_keys", &self.public_keys())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// # Errors
    ///
    /// [`KeyError`] when no key is configured or the public keys do not parse.
    pub fn new(config: &AuthConfig) -> Result<Authenticator, KeyError> {
        let public = match &config.public_keys {
            Some(text) => parse_public_keys(text)?,
            None => Vec::new(),
        };
        if config.hs256_secret.is_none() && public.is_empty() {
            return Err(KeyError::None);
        }
        Ok(Authenticator {
            hs256: config.hs256_secret.as_deref().map(DecodingKey::from_secret),
            public: std::sync::RwLock::new(public),
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            leeway: config.leeway_secs,
        })
    }

    /// Number of public keys in use.
    pub fn public_keys(&self) -> usize {
        self.public.read().map_or(0, |keys| keys.len())
    }

    /// Replaces the public keys with those in `text` (a PEM key or a JWKS document). On error
    /// the keys in use stay.
    ///
    /// # Errors
    ///
    /// [`KeyError`] when `text` holds no usable key.
    pub fn reload_public_keys(&self, text: &str) -> Result<usize, KeyError> {
        let keys = parse_public_keys(text)?;
        let n = keys.len();
        if let Ok(mut public) = self.public.write() {
            *public = keys;
        }
        Ok(n)
    }

    /// Verifies `token` at time `now` (seconds since the Unix epoch).
    ///
    /// The key is chosen by the token's `alg`: HS256 only ever checks against the shared secret
    /// and RS256/ES256 only against public keys of that type, so a public key can never be used
    /// as an HMAC secret (algorithm confusion). `alg: none` does not parse.
    ///
    /// # Errors
    ///
    /// [`AuthError`] saying what is wrong with the token.
    pub fn verify(&self, token: &str, now: u64) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::Json(_) => {
                AuthError::Algorithm("none or unknown".into())
            }
            _ => AuthError::Malformed,
        })?;
        let public = self.public.read().map_err(|_| AuthError::UnknownKey)?;
        // HS256 only ever checks against the shared secret and RS256/ES256 only against public
        // keys of that type. A token without `kid` is tried against every key of its algorithm
        // (a JWKS in rotation holds several); one with a `kid` only against the matching key.
        let candidates: Vec<&DecodingKey> = match header.alg {
            Algorithm::HS256 => self.hs256.iter().collect(),
            Algorithm::RS256 | Algorithm::ES256 => public
                .iter()
                .filter(|k| k.alg == header.alg)
                .filter(|k| header.kid.is_none() || k.kid.is_none() || k.kid == header.kid)
                .map(|k| &k.key)
                .collect(),
            other => return Err(AuthError::Algorithm(format!("{other:?}"))),
        };
        if candidates.is_empty() {
            return Err(if header.alg == Algorithm::HS256 {
                AuthError::Algorithm("HS256".into())
            } else if public.iter().any(|k| k.alg == header.alg) {
                AuthError::UnknownKey
            } else {
                AuthError::Algorithm(format!("{:?}", header.alg))
            });
        }
        let mut validation = Validation::new(header.alg);
        // Time is checked below against the caller's clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        let mut required = Vec::new();
        match &self.issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let mut result = Err(AuthError::Signature);
        for key in candidates {
            result = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                match e.kind() {
                    K::InvalidSignature => AuthError::Signature,
                    K::InvalidIssuer => AuthError::Issuer,
                    K::InvalidAudience => AuthError::Audience,
                    K::MissingRequiredClaim(c) if c == "iss" => AuthError::Issuer,
                    K::MissingRequiredClaim(c) if c == "aud" => AuthError::Audience,
                    K::InvalidAlgorithm => AuthError::Algorithm(format!("{:?}", header.alg)),
                    K::Json(err) => AuthError::Claims(err.to_string()),
                    _ => AuthError::Malformed,
                }
            });
            // Only a signature mismatch is worth another key; every other error is the token's.
            if !matches!(result, Err(AuthError::Signature)) {
                break;
            }
        }
        drop(public);
        let data = result?;
        let claims = data.claims;
        let exp = claims.exp.ok_or(AuthError::NoExpiry)?;
        if exp > MAX_EXP {
            return Err(AuthError::Claims("exp is beyond the year 9999".into()));
        }
        if exp.saturating_add(self.leeway) <= now {
            return Err(AuthError::Expired);
        }
        if claims
            .nbf
            .is_some_and(|nbf| nbf > now.saturating_add(self.leeway))
        {
            return Err(AuthError::NotYetValid);
        }
        // `sub` names the user topic (`/user/{sub}`) that lock events and other users'
        // publishes go to, so it must be a topic id; an `auth0|123` or an e-mail address would
        // silently lose those events. Refused here with a message saying so.
        if !crate::topic::is_valid_id(&claims.sub) {
            return Err(AuthError::Claims(
                "sub must be an id ([A-Za-z0-9_.:-]{1,128}, not '.' or '..'): it names the user topic"
                    .into(),
            ));
        }
        Ok(Principal {
            sub: claims.sub,
            teams: claims.teams.into_iter().collect(),
            admin_of: claims.admin_of.into_iter().collect(),
            // Unknown scopes are ignored, like unknown claims.
            scopes: claims
                .scope
                .split_whitespace()
                .filter_map(Scope::parse)
                .collect(),
            exp: exp.saturating_add(self.leeway).min(MAX_EXP),
            issued_at: claims.iat.or(claims.nbf),
            publish_rate: claims.publish_rate,
        })
    }
}

fn parse_public_keys(text: &str) -> Result<Vec<PublicKey>, KeyError> {
    let invalid = |e: &dyn std::fmt::Display| KeyError::Invalid(e.to_string());
    if text.trim_start().starts_with('{') {
        let set: JwkSet = serde_json::from_str(text).map_err(|e| invalid(&e))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let alg = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                // Symmetric and other keys do not belong in a public key set.
                _ => continue,
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| invalid(&e))?;
            keys.push(PublicKey {
                kid: jwk.common.key_id.clone(),
                alg,
                key,
            });
        }
        if keys.is_empty() {
            return Err(KeyError::Invalid("the JWKS holds no RSA or EC key".into()));
        }
        return Ok(keys);
    }
    let pem = text.as_bytes();
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        return Ok(vec![PublicKey {
            kid: None,
            alg: Algorithm::RS256,
            key,
        }]);
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        return Ok(vec![PublicKey {
            kid: None,
            alg: Algorithm::ES256,
            key,
        }]);
    }
    Err(KeyError::Invalid(
        "not a JWKS document or an RSA/EC public key in PEM".into(),
    ))
}

#[cfg(test)]
mod tests;
