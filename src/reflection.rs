//! gRPC server reflection (`grpc.reflection.v1`) for what one node serves.
//!
//! Written here rather than taken from tonic-reflection's builder (0.14.9)
//! for two things a client needs:
//!
//! - **Only the served services are listed.** Both tandem protos are
//!   embedded in every binary, but a node serves one tandem service (plus
//!   health and reflection); listing the other would send a client to
//!   UNIMPLEMENTED.
//! - **A file comes with its dependencies.** tonic-reflection answers
//!   `FileContainingSymbol` and `FileByFilename` with the one file, so a
//!   client that does not then ask for each import by name (grpcurl-like
//!   tools, Python's reflection client) cannot build `coordinator.proto`,
//!   which imports `participant.proto`. Here the answer carries the file
//!   first, then its transitive imports, each sent once per stream, as
//!   grpc-go's server does (the protocol allows several
//!   `file_descriptor_proto` entries in one response).
//!
//! Errors are `ErrorResponse` messages in the stream, which stays open, as
//! the protocol says. Files are served as `prost_types` re-encodes them:
//! custom options would be dropped, and tandem's protos have none.

use prost::Message;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorProto, FileDescriptorSet};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::server_reflection_server::{ServerReflection, ServerReflectionServer};
use tonic_reflection::pb::v1::{
    ErrorResponse, ExtensionNumberResponse, FileDescriptorResponse, ListServiceResponse, ServerReflectionRequest,
    ServerReflectionResponse, ServiceResponse,
};

/// The standard services every tandem server serves beside its own.
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
pub const REFLECTION_SERVICE: &str = "grpc.reflection.v1.ServerReflection";

/// Most responses queued for one reflection stream before its reader takes
/// them.
const RESPONSES_QUEUED_MAX: usize = 4;

/// Every described file, every symbol, and the services to list.
#[derive(Debug)]
struct Index {
    services: Vec<String>,
    /// File name to its encoded descriptor and the names it imports.
    files: BTreeMap<String, (Vec<u8>, Vec<String>)>,
    /// Fully qualified symbol (service, method, message, field, enum, enum
    /// value) to the name of the file that declares it.
    symbols: HashMap<String, String>,
}

impl Index {
    /// Indexes the files of `encoded_sets` and lists `services`. Fails if a
    /// set does not decode, a file imports one that is not described, or a
    /// listed service is not declared: the embedded sets are the binary's
    /// own, so any of these is a build mistake.
    fn new(encoded_sets: &[&[u8]], services: &[&str]) -> Result<Index, String> {
        let mut index = Index { services: Vec::new(), files: BTreeMap::new(), symbols: HashMap::new() };
        for encoded in encoded_sets {
            let set =
                FileDescriptorSet::decode(*encoded).map_err(|e| format!("a descriptor set does not decode: {e}"))?;
            for file in set.file {
                index.add_file(file)?;
            }
        }
        for (name, (_, imports)) in &index.files {
            if let Some(missing) = imports.iter().find(|import| !index.files.contains_key(*import)) {
                return Err(format!("{name} imports {missing}, which is not described"));
            }
        }
        for service in services {
            if !index.symbols.contains_key(*service) {
                return Err(format!("the service {service} is not described"));
            }
            index.services.push(service.to_string());
        }
        Ok(index)
    }

    fn add_file(&mut self, file: FileDescriptorProto) -> Result<(), String> {
        let name = file.name.clone().ok_or("a file descriptor has no name")?;
        if self.files.contains_key(&name) {
            return Ok(());
        }
        let package = file.package.clone().unwrap_or_default();
        let mut symbols = Vec::new();
        for service in &file.service {
            let service_name = qualified(&package, service.name());
            for method in &service.method {
                symbols.push(qualified(&service_name, method.name()));
            }
            symbols.push(service_name);
        }
        for message in &file.message_type {
            message_symbols(&package, message, &mut symbols);
        }
        for enumeration in &file.enum_type {
            enum_symbols(&package, enumeration, &mut symbols);
        }
        for symbol in symbols {
            self.symbols.insert(symbol, name.clone());
        }
        self.files.insert(name, (file.encode_to_vec(), file.dependency.clone()));
        Ok(())
    }

    fn answer(&self, request: &ServerReflectionRequest, sent: &mut BTreeSet<String>) -> ServerReflectionResponse {
        let answer = match &request.message_request {
            Some(MessageRequest::ListServices(_)) => Ok(MessageResponse::ListServicesResponse(ListServiceResponse {
                service: self.services.iter().map(|name| ServiceResponse { name: name.clone() }).collect(),
            })),
            Some(MessageRequest::FileByFilename(name)) => self.file_with_imports(name, sent),
            Some(MessageRequest::FileContainingSymbol(symbol)) => {
                match self.symbols.get(symbol.strip_prefix('.').unwrap_or(symbol)) {
                    Some(file) => self.file_with_imports(file, sent),
                    None => Err((Code::NotFound, format!("no symbol {symbol:?} is described here"))),
                }
            }
            Some(MessageRequest::FileContainingExtension(_)) => {
                Err((Code::NotFound, "no extension is declared in tandem's protos".to_string()))
            }
            // No extensions: an empty list. Failing would break grpcurl,
            // which asks this of every message type it meets.
            Some(MessageRequest::AllExtensionNumbersOfType(message)) => {
                Ok(MessageResponse::AllExtensionNumbersResponse(ExtensionNumberResponse {
                    base_type_name: message.clone(),
                    extension_number: Vec::new(),
                }))
            }
            None => Err((Code::InvalidArgument, "the request names no question".to_string())),
        };
        let message_response = answer.unwrap_or_else(|(code, message)| {
            MessageResponse::ErrorResponse(ErrorResponse { error_code: code as i32, error_message: message })
        });
        ServerReflectionResponse {
            valid_host: request.host.clone(),
            original_request: Some(request.clone()),
            message_response: Some(message_response),
        }
    }

    /// The file `name` and its transitive imports, breadth first, the file
    /// itself first. The file is always sent; an import is sent only if
    /// this stream has not received it yet (`sent`).
    fn file_with_imports(&self, name: &str, sent: &mut BTreeSet<String>) -> Result<MessageResponse, (Code, String)> {
        if !self.files.contains_key(name) {
            return Err((Code::NotFound, format!("no file {name:?} is described here")));
        }
        let mut files = Vec::new();
        let mut seen = BTreeSet::new();
        let mut queue = VecDeque::from([name.to_string()]);
        while let Some(next) = queue.pop_front() {
            if !seen.insert(next.clone()) {
                continue;
            }
            let (encoded, imports) = &self.files[&next];
            let first = files.is_empty();
            if sent.insert(next) || first {
                files.push(encoded.clone());
            }
            queue.extend(imports.iter().cloned());
        }
        Ok(MessageResponse::FileDescriptorResponse(FileDescriptorResponse { file_descriptor_proto: files }))
    }
}

fn qualified(scope: &str, name: &str) -> String {
    if scope.is_empty() {
        name.to_string()
    } else {
        format!("{scope}.{name}")
    }
}

fn message_symbols(scope: &str, message: &DescriptorProto, symbols: &mut Vec<String>) {
    let name = qualified(scope, message.name());
    for field in &message.field {
        symbols.push(qualified(&name, field.name()));
    }
    for oneof in &message.oneof_decl {
        symbols.push(qualified(&name, oneof.name()));
    }
    for nested in &message.nested_type {
        message_symbols(&name, nested, symbols);
    }
    for enumeration in &message.enum_type {
        enum_symbols(&name, enumeration, symbols);
    }
    symbols.push(name);
}

/// An enum and its values; as in protobuf's scoping, the values are
/// siblings of the enum, not inside it.
fn enum_symbols(scope: &str, enumeration: &EnumDescriptorProto, symbols: &mut Vec<String>) {
    symbols.push(qualified(scope, enumeration.name()));
    for value in &enumeration.value {
        symbols.push(qualified(scope, value.name()));
    }
}

/// The reflection service of a node that serves `service` (besides health
/// and reflection).
#[derive(Debug, Clone)]
pub struct Reflection {
    index: Arc<Index>,
}

impl Reflection {
    /// Describes every tandem proto, health and reflection, and lists
    /// `service`, [`HEALTH_SERVICE`] and [`REFLECTION_SERVICE`].
    pub fn for_service(service: &str) -> Reflection {
        let index = Index::new(
            &[
                crate::pb::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            ],
            &[service, HEALTH_SERVICE, REFLECTION_SERVICE],
        )
        .expect("the embedded descriptor sets describe the served services");
        Reflection { index: Arc::new(index) }
    }

    pub fn into_server(self) -> ServerReflectionServer<Reflection> {
        ServerReflectionServer::new(self)
    }
}

#[tonic::async_trait]
impl ServerReflection for Reflection {
    type ServerReflectionInfoStream = ReceiverStream<Result<ServerReflectionResponse, Status>>;

    async fn server_reflection_info(
        &self,
        request: Request<Streaming<ServerReflectionRequest>>,
    ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
        let mut requests = request.into_inner();
        let (responses, stream) = mpsc::channel(RESPONSES_QUEUED_MAX);
        let index = self.index.clone();
        // One task per stream, ended by the client closing its side or
        // dropping the stream.
        tokio::spawn(async move {
            let mut sent = BTreeSet::new();
            while let Ok(Some(request)) = requests.message().await {
                if responses.send(Ok(index.answer(&request, &mut sent))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;

    fn ask(message: MessageRequest) -> ServerReflectionRequest {
        ServerReflectionRequest { host: String::new(), message_request: Some(message) }
    }

    fn file_names(response: &ServerReflectionResponse) -> Vec<String> {
        let Some(MessageResponse::FileDescriptorResponse(files)) = &response.message_response else {
            panic!("not files: {response:?}")
        };
        files
            .file_descriptor_proto
            .iter()
            .map(|encoded| FileDescriptorProto::decode(encoded.as_slice()).unwrap().name().to_string())
            .collect()
    }

    /// A real gRPC round trip on a port-0 listener: the service lists what
    /// is served, and a file comes with its imports.
    #[tokio::test]
    async fn lists_only_the_served_service_and_sends_a_file_with_its_imports() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(Reflection::for_service("tandem.v1.Coordinator").into_server())
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut client = ServerReflectionClient::new(
            crate::server::channel(&format!("http://{addr}"), &crate::tls::Security::Insecure).unwrap(),
        );
        let requests = vec![
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol("tandem.v1.Coordinator".into())),
            // Asked again on the same stream: the file again, its import not.
            ask(MessageRequest::FileContainingSymbol("tandem.v1.AuditResponse".into())),
            ask(MessageRequest::FileContainingSymbol("tandem.v1.NoSuchThing".into())),
            ask(MessageRequest::FileByFilename("tandem/v1/participant.proto".into())),
        ];
        let mut stream = client.server_reflection_info(tokio_stream::iter(requests)).await.unwrap().into_inner();
        let mut responses = Vec::new();
        while let Some(response) = stream.message().await.unwrap() {
            responses.push(response);
        }
        assert_eq!(responses.len(), 5, "one answer per question, errors included: {responses:?}");

        let Some(MessageResponse::ListServicesResponse(list)) = &responses[0].message_response else {
            panic!("{:?}", responses[0])
        };
        let listed: BTreeSet<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(listed, BTreeSet::from(["tandem.v1.Coordinator", HEALTH_SERVICE, REFLECTION_SERVICE]));

        assert_eq!(file_names(&responses[1]), ["tandem/v1/coordinator.proto", "tandem/v1/participant.proto"]);
        assert_eq!(file_names(&responses[2]), ["tandem/v1/coordinator.proto"]);
        let Some(MessageResponse::ErrorResponse(error)) = &responses[3].message_response else {
            panic!("{:?}", responses[3])
        };
        assert_eq!(error.error_code, Code::NotFound as i32);
        assert_eq!(file_names(&responses[4]), ["tandem/v1/participant.proto"]);
        server.abort();
    }

    #[test]
    fn symbols_of_every_kind_resolve_to_their_file() {
        let index = Index::new(&[crate::pb::FILE_DESCRIPTOR_SET], &["tandem.v1.Participant"]).unwrap();
        for (symbol, file) in [
            ("tandem.v1.Participant", "tandem/v1/participant.proto"),
            ("tandem.v1.Participant.Prepare", "tandem/v1/participant.proto"),
            ("tandem.v1.Leg", "tandem/v1/participant.proto"),
            ("tandem.v1.Leg.amount", "tandem/v1/participant.proto"),
            ("tandem.v1.Coordinator.Audit", "tandem/v1/coordinator.proto"),
            ("tandem.v1.Outcome", "tandem/v1/coordinator.proto"),
            ("tandem.v1.OUTCOME_COMMITTED", "tandem/v1/coordinator.proto"),
        ] {
            assert_eq!(index.symbols.get(symbol).map(String::as_str), Some(file), "{symbol}");
        }
        assert!(Index::new(&[crate::pb::FILE_DESCRIPTOR_SET], &["tandem.v1.Nothing"]).is_err());
        // An import that is not described is refused at construction.
        let coordinator_only = FileDescriptorSet {
            file: FileDescriptorSet::decode(crate::pb::FILE_DESCRIPTOR_SET)
                .unwrap()
                .file
                .into_iter()
                .filter(|file| file.name() == "tandem/v1/coordinator.proto")
                .collect(),
        };
        let encoded = coordinator_only.encode_to_vec();
        assert!(Index::new(&[encoded.as_slice()], &[]).unwrap_err().contains("participant.proto"));
    }
}
