//! The OpenAPI document, generated from the route table: every route with
//! its guard (`x-guard`), body limit (`x-body-limit`), path parameters and
//! schemas.

use super::guard::Guard;
use super::routes::RouteDoc;

/// The OpenAPI 3.1 document for the route table `routes`.
pub fn document(routes: &[RouteDoc]) -> utoipa::openapi::OpenApi {
    use utoipa::openapi::content::ContentBuilder;
    use utoipa::openapi::path::{
        HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItem,
    };
    use utoipa::openapi::request_body::RequestBodyBuilder;
    use utoipa::openapi::response::ResponseBuilder;
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Schema, SchemaType, Type};
    use utoipa::openapi::security::{
        HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
    };
    use utoipa::openapi::{ComponentsBuilder, InfoBuilder, OpenApiBuilder, PathsBuilder, RefOr};

    let mut components = ComponentsBuilder::new()
        .schema_from::<crate::inventory::model::Distro>()
        .schema_from::<crate::inventory::model::Profile>()
        .schema_from::<crate::inventory::model::System>()
        .schema_from::<crate::inventory::model::Interface>()
        .schema_from::<crate::inventory::model::Power>()
        .schema_from::<crate::inventory::model::Repo>()
        .schema_from::<crate::inventory::model::Image>()
        .schema_from::<crate::inventory::model::Text>()
        .schema_from::<crate::inventory::model::Kind>()
        .schema_from::<crate::inventory::Settings>()
        .schema_from::<crate::inventory::DefaultBoot>()
        .schema_from::<crate::inventory::blend::Blended>()
        .schema_from::<crate::inventory::blend::Sourced>()
        .schema_from::<crate::inventory::status::StatusRow>()
        .schema_from::<crate::inventory::status::Record>()
        .schema_from::<crate::inventory::status::State>()
        .schema_from::<crate::inventory::status::Event>()
        .schema_from::<crate::inventory::api::StatusReport>()
        .schema_from::<crate::inventory::api::NewName>()
        .schema_from::<crate::inventory::api::Removed>()
        .schema_from::<crate::inventory::api::BulkEdited>()
        .schema_from::<crate::inventory::api::Batch>()
        .schema_from::<crate::inventory::api::BatchItem>()
        .schema_from::<crate::bmc::api::PowerStatus>()
        .schema_from::<crate::bmc::api::PowerRequest>()
        .schema_from::<crate::inventory::api::PreviewRequest>()
        .schema_from::<crate::bmc::api::PowerAction>()
        .schema_from::<crate::bmc::api::PowerDone>()
        .schema_from::<crate::bmc::api::MediaRequest>()
        .schema_from::<crate::bmc::api::MediaAction>()
        .schema_from::<crate::bmc::api::MediaDone>()
        .schema_from::<crate::bmc::PowerState>()
        .schema_from::<crate::bmc::BootDevice>()
        .schema(
            "Error",
            ObjectBuilder::new()
                .property(
                    "code",
                    ObjectBuilder::new().schema_type(SchemaType::new(Type::String)),
                )
                .property(
                    "message",
                    ObjectBuilder::new().schema_type(SchemaType::new(Type::String)),
                )
                .required("code")
                .required("message"),
        )
        .security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        )
        .build();
    components
        .schemas
        .entry("Object".into())
        .or_insert_with(|| RefOr::T(Schema::Object(ObjectBuilder::new().build())));

    let schema_ref = |name: &str| -> RefOr<Schema> {
        if let Some(inner) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
            let items: RefOr<Schema> = utoipa::openapi::Ref::from_schema_name(inner).into();
            RefOr::T(Schema::Array(ArrayBuilder::new().items(items).build()))
        } else {
            utoipa::openapi::Ref::from_schema_name(name).into()
        }
    };
    let mut paths = PathsBuilder::new();
    for route in routes {
        let kinds: Vec<Option<crate::inventory::model::Kind>> =
            if route.path.starts_with("/api/v1/{kind}") {
                crate::inventory::model::Kind::ALL
                    .iter()
                    .map(|k| Some(*k))
                    .collect()
            } else {
                vec![None]
            };
        for kind in kinds {
            let path = match kind {
                Some(k) => route.path.replace("{kind}", k.plural()),
                None => route.path.to_owned(),
            };
            let resolve = |s: &str| -> String {
                match (s, kind) {
                    (".", Some(k)) => crate::inventory::api::kind_schema(k).to_owned(),
                    ("[]", Some(k)) => format!("[{}]", crate::inventory::api::kind_schema(k)),
                    _ => s.to_owned(),
                }
            };
            let mut op = OperationBuilder::new()
                .summary(Some(match kind {
                    Some(k) => format!("{} ({})", route.summary, k.plural()),
                    None => route.summary.to_owned(),
                }))
                .operation_id(Some(format!(
                    "{}_{}",
                    route.method.as_str().to_ascii_lowercase(),
                    path.trim_start_matches('/')
                        .replace(['/', '.', '-'], "_")
                        .replace(['{', '}'], "")
                )))
                .tag(
                    kind.map(|k| k.plural())
                        .unwrap_or(if path.starts_with("/cblr") {
                            "cobbler"
                        } else {
                            "appliance"
                        }),
                );
            for seg in path.split('/') {
                if let Some(p) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    op = op.parameter(
                        ParameterBuilder::new()
                            .name(p)
                            .parameter_in(ParameterIn::Path)
                            .required(utoipa::openapi::Required::True)
                            .schema(Some(
                                ObjectBuilder::new().schema_type(SchemaType::new(Type::String)),
                            )),
                    );
                }
            }
            if route.method == axum::http::Method::DELETE {
                op = op.parameter(
                    ParameterBuilder::new()
                        .name("recursive")
                        .parameter_in(ParameterIn::Query)
                        .required(utoipa::openapi::Required::False)
                        .schema(Some(
                            ObjectBuilder::new().schema_type(SchemaType::new(Type::Boolean)),
                        )),
                );
            }
            if route.response.is_some_and(|r| r.starts_with('[')) {
                for (name, ty) in [("limit", Type::Integer), ("after", Type::String)] {
                    op = op.parameter(
                        ParameterBuilder::new()
                            .name(name)
                            .parameter_in(ParameterIn::Query)
                            .required(utoipa::openapi::Required::False)
                            .schema(Some(ObjectBuilder::new().schema_type(SchemaType::new(ty)))),
                    );
                }
            }
            if let Some(req) = route.request {
                op = op.request_body(Some(
                    RequestBodyBuilder::new()
                        .content(
                            "application/json",
                            ContentBuilder::new()
                                .schema(Some(schema_ref(&resolve(req))))
                                .build(),
                        )
                        .required(Some(utoipa::openapi::Required::True))
                        .build(),
                ));
            }
            let ok = match route.response.map(resolve).as_deref() {
                Some("text") => ResponseBuilder::new()
                    .description("OK")
                    .content("text/plain", ContentBuilder::new().build()),
                Some("binary") => ResponseBuilder::new()
                    .description("OK")
                    .content("application/octet-stream", ContentBuilder::new().build()),
                // A list answers one page: `{"items": [...], "next": cursor|null}`.
                Some(s) if s.starts_with('[') => ResponseBuilder::new().description("OK").content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(RefOr::T(Schema::Object(
                            ObjectBuilder::new()
                                .property("items", schema_ref(s))
                                .property(
                                    "next",
                                    ObjectBuilder::new().schema_type(SchemaType::from_iter([
                                        Type::String,
                                        Type::Null,
                                    ])),
                                )
                                .required("items")
                                .required("next")
                                .build(),
                        ))))
                        .build(),
                ),
                Some(s) => ResponseBuilder::new().description("OK").content(
                    "application/json",
                    ContentBuilder::new().schema(Some(schema_ref(s))).build(),
                ),
                None => ResponseBuilder::new().description("OK"),
            };
            let code = if route.creates { "201" } else { "200" };
            op = op.response(code, ok.build());
            op = op.response(
                "default",
                ResponseBuilder::new()
                    .description("Error with a stable code")
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(schema_ref("Error")))
                            .build(),
                    )
                    .build(),
            );
            if route.guard != Guard::Public {
                op = op.security(SecurityRequirement::new("bearer", Vec::<String>::new()));
            }
            op = op.extensions(Some(
                utoipa::openapi::extensions::ExtensionsBuilder::new()
                    .add("x-guard", route.guard.as_str())
                    .add("x-body-limit", route.body_limit)
                    .build(),
            ));
            let method = match route.method {
                axum::http::Method::GET => HttpMethod::Get,
                axum::http::Method::POST => HttpMethod::Post,
                axum::http::Method::PUT => HttpMethod::Put,
                axum::http::Method::PATCH => HttpMethod::Patch,
                _ => HttpMethod::Delete,
            };
            paths = paths.path(path, PathItem::new(method, op.build()));
        }
    }
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("appliance API")
                .version(env!("CARGO_PKG_VERSION"))
                .build(),
        )
        .paths(paths.build())
        .components(Some(components))
        .build()
}
