//! Node authentication (istiod-lite's KubernetesAuthenticator): TokenReview
//! creation and reading one pod.

use super::*;

/// What TokenReview answers for a registered token.
pub(super) enum FakeToken {
    /// A valid token of `user` (a UserInfo), issued for `audiences`.
    Valid { audiences: Vec<String>, user: Value },
    /// This `status`, verbatim: answers a real server would not give.
    Raw(Value),
}

const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

impl FakeApiServer {
    /// Makes `token` valid for `audiences`, authenticating as `user` (a
    /// UserInfo: username, groups, extra). Other tokens are reviewed as not
    /// authenticated.
    pub fn add_token(&self, token: &str, audiences: &[&str], user: Value) {
        let audiences = audiences.iter().map(|a| a.to_string()).collect();
        self.lock()
            .tokens
            .insert(token.to_string(), FakeToken::Valid { audiences, user });
    }

    /// Reviews of `token` answer with this `status`, whatever was asked.
    pub fn add_token_review_answer(&self, token: &str, status: Value) {
        self.lock()
            .tokens
            .insert(token.to_string(), FakeToken::Raw(status));
    }
}

pub(super) enum AuthRoute {
    TokenReview,
    Pod { namespace: String, name: String },
}

pub(super) fn auth_route(req: &Request<Incoming>) -> Option<AuthRoute> {
    let path = req.uri().path();
    if req.method() == hyper::Method::POST && path == TOKEN_REVIEWS {
        return Some(AuthRoute::TokenReview);
    }
    if req.method() != hyper::Method::GET {
        return None;
    }
    let (namespace, rest) = path.strip_prefix("/api/v1/namespaces/")?.split_once('/')?;
    let name = rest.strip_prefix("pods/")?;
    (!name.is_empty() && !name.contains('/')).then(|| AuthRoute::Pod {
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

pub(super) async fn serve_auth(
    shared: &Shared,
    route: AuthRoute,
    req: Request<Incoming>,
) -> Response<Body> {
    match route {
        AuthRoute::Pod { namespace, name } => {
            let mut inner = shared.inner.lock().expect("fake API server lock");
            count(&mut inner, "get pod".to_string());
            let pod = resource_of_kind("Pod")
                .and_then(|r| inner.objects.get(&r))
                .and_then(|m| m.get(&(namespace, name.clone())));
            match pod {
                Some(pod) => json_response(StatusCode::OK, pod),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("pods \"{name}\" not found"),
                ),
            }
        }
        AuthRoute::TokenReview => {
            let Ok(body) = req.into_body().collect().await else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
            };
            let review: Value = match serde_json::from_slice(&body.to_bytes()) {
                Ok(v) => v,
                Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
            };
            if review["apiVersion"] != "authentication.k8s.io/v1" || review["kind"] != "TokenReview"
            {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "not a TokenReview");
            }
            let token = review["spec"]["token"].as_str().unwrap_or_default();
            let asked: Vec<&str> = review["spec"]["audiences"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let mut inner = shared.inner.lock().expect("fake API server lock");
            count(&mut inner, "create tokenreviews".to_string());
            let answer = match inner.tokens.get(token) {
                None => json!({"user": {}, "error": "invalid bearer token"}),
                Some(FakeToken::Raw(status)) => status.clone(),
                Some(FakeToken::Valid { audiences, user }) => {
                    // As the API server: the answer names the audiences both
                    // the token and the review have; none in common is a
                    // failed review. Unasked, the token's own count.
                    let common: Vec<&str> = if asked.is_empty() {
                        audiences.iter().map(String::as_str).collect()
                    } else {
                        asked
                            .iter()
                            .copied()
                            .filter(|a| audiences.iter().any(|t| t == a))
                            .collect()
                    };
                    if common.is_empty() {
                        json!({"user": {}, "error": format!(
                            "token audiences {audiences:?} is invalid for the target audiences {asked:?}"
                        )})
                    } else {
                        json!({"authenticated": true, "user": user, "audiences": common})
                    }
                }
            };
            json_response(
                StatusCode::CREATED,
                &json!({
                    "kind": "TokenReview",
                    "apiVersion": "authentication.k8s.io/v1",
                    "metadata": {},
                    "spec": review["spec"],
                    "status": answer,
                }),
            )
        }
    }
}
