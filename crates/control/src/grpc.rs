//! The gRPC API for proxies: one `Session` stream per proxy, translated to [`Hub`] calls.
//!
//! Everything from the network is converted through `trellis_api` (malformed messages end the
//! stream with `INVALID_ARGUMENT`, never a panic). The session ends — and its instances leave
//! the registry at once — when the stream breaks, so callers stop using a dead proxy within
//! moments; a proxy that hangs with its connection open is expired by heartbeat TTL.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use trellis_api::pb;
use trellis_core::discovery::InstanceInfo;
use trellis_core::identity::SpiffeId;
use trellis_core::names::ServiceName;

use crate::ca::{Ca, CaError};
use crate::hub::{Hub, Push, SessionId};
use crate::observe::Observer;
use crate::tls_server::PeerInfo;
use crate::tokens::Tokens;

pub struct ControlService {
    hub: Hub,
    heartbeat_interval: Duration,
    heartbeat_ttl: Duration,
    ca: Arc<Ca>,
    tokens: Arc<Tokens>,
    trust_domain: String,
    certificates_issued: Counter,
    observer: Arc<Observer>,
}

impl ControlService {
    pub fn new(
        hub: Hub,
        heartbeat_ttl: Duration,
        ca: Arc<Ca>,
        tokens: Arc<Tokens>,
        trust_domain: String,
        certificates_issued: Counter,
        observer: Arc<Observer>,
    ) -> Self {
        Self {
            hub,
            heartbeat_interval: heartbeat_ttl / 3,
            heartbeat_ttl,
            ca,
            tokens,
            trust_domain,
            certificates_issued,
            observer,
        }
    }

    pub fn into_server(self) -> pb::proxy_control_server::ProxyControlServer<Self> {
        pb::proxy_control_server::ProxyControlServer::new(self)
            .max_decoding_message_size(4 * 1024 * 1024)
    }
}

type PushStream = Pin<Box<dyn Stream<Item = Result<pb::ControlMessage, Status>> + Send>>;

fn service_name(s: &str) -> Result<ServiceName, Status> {
    ServiceName::new(s).map_err(|e| Status::invalid_argument(format!("service {s:?}: {e}")))
}

/// Ends the session when dropped, however the session task ends.
struct SessionGuard {
    hub: Hub,
    id: SessionId,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.hub.close_session(self.id);
    }
}

fn ca_status(e: CaError) -> Status {
    match e {
        CaError::WrongIdentity { .. } => Status::permission_denied(e.to_string()),
        e if e.is_callers_fault() => Status::invalid_argument(e.to_string()),
        e => Status::internal(e.to_string()),
    }
}

/// The first message of a session: the registration, with its instance and watch list checked.
async fn read_register(
    inbound: &mut Streaming<pb::ProxyMessage>,
) -> Result<(InstanceInfo, Vec<ServiceName>), Status> {
    let first = inbound
        .message()
        .await?
        .and_then(|m| m.message)
        .ok_or_else(|| Status::invalid_argument("the first message must be register"))?;
    let pb::proxy_message::Message::Register(register) = first else {
        return Err(Status::invalid_argument(
            "the first message must be register",
        ));
    };
    let instance = register
        .instance
        .ok_or_else(|| Status::invalid_argument("register.instance is required"))?;
    let instance =
        InstanceInfo::try_from(instance).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if register.watching.len() > crate::hub::MAX_WATCHES_PER_SESSION {
        return Err(Status::resource_exhausted(format!(
            "register.watching has {} services; at most {} may be watched",
            register.watching.len(),
            crate::hub::MAX_WATCHES_PER_SESSION
        )));
    }
    let watching = register
        .watching
        .iter()
        .map(|s| service_name(s))
        .collect::<Result<_, _>>()?;
    Ok((instance, watching))
}

#[tonic::async_trait]
impl pb::proxy_control_server::ProxyControl for ControlService {
    type SessionStream = PushStream;

    async fn certify(
        &self,
        request: Request<pb::CertifyRequest>,
    ) -> Result<Response<pb::CertifyResponse>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let remote = peer.as_ref().map(|p| p.remote);
        let renewing = peer.and_then(|p| p.identity);
        let renewing_audit = renewing.is_some();
        let req = request.into_inner();
        let (ca, tokens, td) = (
            self.ca.clone(),
            self.tokens.clone(),
            self.trust_domain.clone(),
        );
        // Token redemption writes to the store: off the async threads.
        let outcome = tokio::task::spawn_blocking(move || -> Result<_, Status> {
            let asked = Ca::requested_identity(&req.csr_pem).map_err(ca_status)?;
            let allowed = match renewing {
                // Renewal over mTLS: the same identity, nothing else.
                Some(id) => id,
                None if req.token.is_empty() => {
                    return Err(Status::unauthenticated(
                        "a join token (--token-file) or a current certificate is required",
                    ));
                }
                None => {
                    let (ns, svc) = tokens.redeem(&req.token).map_err(|e| {
                        if e.is_callers_fault() {
                            Status::unauthenticated(e.to_string())
                        } else {
                            Status::internal(e.to_string())
                        }
                    })?;
                    SpiffeId::new(&td, ns, svc)
                }
            };
            let issued = ca.sign(&req.csr_pem, &allowed).map_err(ca_status)?;
            Ok((asked, issued, ca.bundle_pem().to_owned()))
        })
        .await
        .map_err(|_| Status::internal("signing failed"))?;
        let (identity, issued, bundle) = match outcome {
            Ok(v) => v,
            Err(status) => {
                tracing::info!(?remote, code = ?status.code(), reason = status.message(), "refused certificate request");
                return Err(status);
            }
        };
        self.certificates_issued.inc();
        self.observer.certificate_issued(
            &identity,
            &issued.serial,
            issued.not_after_unix,
            renewing_audit,
        );
        tracing::info!(?remote, %identity, serial = %issued.serial, expires = issued.not_after_unix, "issued workload certificate");
        Ok(Response::new(pb::CertifyResponse {
            cert_chain_pem: issued.chain_pem,
            trust_bundle_pem: bundle,
            expires_unix: issued.not_after_unix,
        }))
    }

    async fn session(
        &self,
        request: Request<Streaming<pb::ProxyMessage>>,
    ) -> Result<Response<PushStream>, Status> {
        let info = request.extensions().get::<PeerInfo>().cloned();
        let peer = info.as_ref().map(|p| p.remote);
        let identity = info.and_then(|p| p.identity);
        let mut inbound = request.into_inner();
        let checked = match identity {
            None => Err(Status::unauthenticated(
                "a session needs a client certificate (obtain one with Certify)",
            )),
            Some(id) => read_register(&mut inbound)
                .await
                .and_then(|(instance, watching)| {
                    if instance.service == id.service && instance.namespace == id.namespace {
                        Ok((instance, watching))
                    } else {
                        Err(Status::permission_denied(format!(
                            "the instance claims service {}/{} but the certificate is {id}",
                            instance.namespace.as_str(),
                            instance.service.as_str()
                        )))
                    }
                }),
        };
        let (instance, watching) = match checked {
            Ok(first) => first,
            Err(status) => {
                tracing::info!(?peer, code = ?status.code(), reason = status.message(), "refused proxy session");
                return Err(status);
            }
        };

        let identity_label = format!(
            "{}/{}",
            instance.namespace.as_str(),
            instance.service.as_str()
        );
        let (id, mut pushes) = self.hub.open_session();
        let guard = SessionGuard {
            hub: self.hub.clone(),
            id,
        };
        tracing::info!(session = id, service = %instance.service, instance = %instance.instance_id, address = %instance.address, "proxy connected");
        self.hub
            .register(id, instance)
            .map_err(|e| Status::internal(e.to_string()))?;
        for s in watching {
            self.hub
                .watch(id, s)
                .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        }

        let (tx, rx) = mpsc::channel::<Result<pb::ControlMessage, Status>>(64);
        let registered = pb::ControlMessage {
            message: Some(pb::control_message::Message::Registered(pb::Registered {
                heartbeat_interval_ms: self.heartbeat_interval.as_millis() as u64,
                heartbeat_ttl_ms: self.heartbeat_ttl.as_millis() as u64,
            })),
        };
        let _ = tx.send(Ok(registered)).await;

        // Outbound: hub pushes → wire.
        let out = tx.clone();
        tokio::spawn(async move {
            while let Some(push) = pushes.recv().await {
                let msg = match push {
                    Push::Destination(d) => pb::control_message::Message::Destination((&*d).into()),
                    Push::MeshConfig(m) => pb::control_message::Message::MeshConfig((&m).into()),
                    Push::TrustBundle(pem) => {
                        pb::control_message::Message::TrustBundle(pb::TrustBundle { pem })
                    }
                    Push::SignalsRequest {
                        query_id,
                        window_secs,
                        paths,
                    } => pb::control_message::Message::SignalsRequest(pb::SignalsRequest {
                        query_id,
                        window_secs,
                        paths,
                    }),
                    Push::TapStart {
                        tap_id,
                        path_prefix,
                        method,
                        max_per_second,
                    } => pb::control_message::Message::TapStart(pb::TapStart {
                        tap_id,
                        path_prefix,
                        method,
                        max_per_second,
                    }),
                    Push::TapStop { tap_id } => {
                        pb::control_message::Message::TapStop(pb::TapStop { tap_id })
                    }
                    Push::Inbound(v) => {
                        pb::control_message::Message::InboundPolicy(pb::InboundPolicy {
                            policies: v.policies.iter().map(Into::into).collect(),
                            routes: Some((&v.routes).into()),
                            rate_limits: v.rate_limits.iter().map(Into::into).collect(),
                        })
                    }
                };
                if out
                    .send(Ok(pb::ControlMessage { message: Some(msg) }))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });

        // Inbound: wire → hub, until the stream ends or misbehaves.
        let hub = self.hub.clone();
        let observer = self.observer.clone();
        tokio::spawn(async move {
            let _guard = guard;
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(session = id, error = %e, "proxy stream broke");
                        break;
                    }
                };
                let result = match msg.message {
                    Some(pb::proxy_message::Message::Heartbeat(h)) => hub
                        .heartbeat(id, Some((h.cert_expires_unix, h.sent_unix_ms)))
                        .map_err(|e| Status::internal(e.to_string())),
                    Some(pb::proxy_message::Message::Watch(w)) => match service_name(&w.service) {
                        Ok(s) => hub
                            .watch(id, s)
                            .map_err(|e| Status::resource_exhausted(e.to_string())),
                        Err(e) => Err(e),
                    },
                    Some(pb::proxy_message::Message::Unwatch(w)) => {
                        service_name(&w.service).map(|s| hub.unwatch(id, &s))
                    }
                    Some(pb::proxy_message::Message::Deregister(_)) => {
                        tracing::info!(session = id, "proxy deregistered (draining)");
                        hub.deregister(id);
                        Ok(())
                    }
                    Some(pb::proxy_message::Message::Signals(report)) => {
                        observer.signals_report(id, report);
                        Ok(())
                    }
                    Some(pb::proxy_message::Message::TapEvent(event)) => {
                        observer.tap_event(id, event);
                        Ok(())
                    }
                    Some(pb::proxy_message::Message::Denials(d)) => {
                        observer.denials(&identity_label, d);
                        Ok(())
                    }
                    Some(pb::proxy_message::Message::Register(_)) => {
                        Err(Status::invalid_argument("register may only be sent once"))
                    }
                    None => Err(Status::invalid_argument("empty message")),
                };
                if let Err(status) = result {
                    tracing::info!(session = id, %status, "closing proxy session");
                    let _ = tx.send(Err(status)).await;
                    break;
                }
            }
            tracing::info!(session = id, "proxy disconnected");
        });

        let stream = tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }
}
