//! The OpenAPI document, generated from the handlers' annotations.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(title = "Lockstep API", description = "Publish events, manage edit locks, presign object URLs."),
    paths(
        crate::publish::publish,
        crate::publish::publish_batch,
        crate::locks::acquire,
        crate::locks::renew,
        crate::locks::release,
        crate::locks::get,
        crate::locks::list,
        crate::locks::acquire_batch,
        crate::locks::release_batch,
        crate::presign::presign,
        crate::presign::presign_batch,
        crate::presign::commit,
    ),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

pub(crate) async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
