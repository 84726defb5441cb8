//! The OpenAPI document (served at `/openapi.json`, browsed at `/docs`).

use utoipa::{
    Modify, OpenApi,
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
};

use super::{admin, contacts, error, events, health, mailboxes, metrics, queues};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "mailqueue",
        description = "Contact-center email queue: claim, work and answer contacts that arrive in Microsoft 365 \
                       mailboxes. Every `/v1` route needs `Authorization: Bearer <token>`; agent tokens see only \
                       their queues and languages. Errors are `{ \"error\": code, \"message\": text }`."
    ),
    paths(
        queues::list,
        mailboxes::list,
        contacts::claim,
        contacts::detail,
        contacts::raw_message,
        contacts::attachment,
        contacts::heartbeat,
        contacts::release,
        contacts::transfer,
        contacts::close,
        contacts::reopen,
        contacts::assign,
        contacts::reply,
        events::poll,
        events::stream,
        admin::reload,
        health::healthz,
        health::readyz,
        metrics::metrics,
    ),
    components(schemas(
        crate::contacts::Contact,
        crate::messages::ContactDetail,
        crate::messages::MessageView,
        crate::messages::AttachmentMeta,
        crate::outbox::Reply,
        crate::outbox::ReplyRequest,
        crate::outbox::ReplyAttachment,
        crate::queues::QueueStats,
        crate::queues::LanguageStats,
        crate::events::Event,
        error::ErrorBody,
        contacts::ClaimRequest,
        contacts::TransferRequest,
        contacts::AssignRequest,
        events::EventsPage,
        health::Health,
        crate::mailboxes::MailboxStatus,
        crate::mailboxes::MailboxState,
        crate::mailboxes::MailboxError,
        crate::reload::ReloadReport,
        crate::reload::Changes,
        crate::reload::TokenChanges,
        crate::reload::NeedsRestart,
        crate::reload::ConfigProblem,
        admin::ReloadRefused,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "queues", description = "Queue figures"),
        (name = "mailboxes", description = "The mailboxes mail is fetched from"),
        (name = "contacts", description = "Claiming and working contacts"),
        (name = "events", description = "The event log"),
        (name = "health", description = "Liveness, readiness and metrics"),
        (name = "admin", description = "Operations: configuration reload"),
    )
)]
pub struct ApiDoc;

/// Declares the `bearer` security scheme the routes refer to.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API token secret from the configuration"))
                    .build(),
            ),
        );
    }
}
