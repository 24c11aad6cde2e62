//! Sparkplug B topic names: `spBv1.0/{group_id}/{message_type}/{edge_node_id}[/{device_id}]`
//! and a host application's `spBv1.0/STATE/{host_id}`.
//!
//! Parsing validates what the specification requires of the namespace
//! ("Topics" chapter): the `spBv1.0` prefix, a known message type, a
//! device id exactly on the device-level types (DBIRTH, DDEATH, DDATA,
//! DCMD) and never on the node-level ones, and ids that are non-empty and
//! free of the MQTT wildcards `+` and `#` (a `/` cannot appear: it splits).

use std::fmt;

/// The namespace element of every Sparkplug B topic.
pub const NAMESPACE: &str = "spBv1.0";

/// The message types of the Sparkplug B topic namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    NBirth,
    NDeath,
    DBirth,
    DDeath,
    NData,
    DData,
    NCmd,
    DCmd,
    State,
}

impl MessageType {
    /// The topic token (`NBIRTH`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NBirth => "NBIRTH",
            Self::NDeath => "NDEATH",
            Self::DBirth => "DBIRTH",
            Self::DDeath => "DDEATH",
            Self::NData => "NDATA",
            Self::DData => "DDATA",
            Self::NCmd => "NCMD",
            Self::DCmd => "DCMD",
            Self::State => "STATE",
        }
    }

    fn from_token(token: &str) -> Option<Self> {
        Some(match token {
            "NBIRTH" => Self::NBirth,
            "NDEATH" => Self::NDeath,
            "DBIRTH" => Self::DBirth,
            "DDEATH" => Self::DDeath,
            "NDATA" => Self::NData,
            "DDATA" => Self::DData,
            "NCMD" => Self::NCmd,
            "DCMD" => Self::DCmd,
            "STATE" => Self::State,
            _ => return None,
        })
    }

    /// Whether the topic of this type names a device.
    pub fn is_device_level(self) -> bool {
        matches!(self, Self::DBirth | Self::DDeath | Self::DData | Self::DCmd)
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message from or to an edge node or one of its devices.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EdgeTopic {
    pub group_id: String,
    pub message_type: MessageType,
    pub edge_node_id: String,
    /// Present exactly on device-level message types.
    pub device_id: Option<String>,
}

impl fmt::Display for EdgeTopic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{NAMESPACE}/{}/{}/{}",
            self.group_id, self.message_type, self.edge_node_id
        )?;
        if let Some(device) = &self.device_id {
            write!(f, "/{device}")?;
        }
        Ok(())
    }
}

/// A parsed Sparkplug B topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    Edge(EdgeTopic),
    /// `spBv1.0/STATE/{host_id}`: a host application's birth/death.
    HostState {
        host_id: String,
    },
}

/// Why a topic is not a Sparkplug B topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("not in the {NAMESPACE} namespace")]
    Namespace,
    #[error("too few levels for a Sparkplug topic")]
    TooFewLevels,
    #[error("unknown message type {0:?}")]
    UnknownMessageType(String),
    #[error("{0} topics have four levels: {NAMESPACE}/group/{0}/node")]
    NodeLevelShape(MessageType),
    #[error("{0} topics have five levels: {NAMESPACE}/group/{0}/node/device")]
    DeviceLevelShape(MessageType),
    #[error("STATE topics are {NAMESPACE}/STATE/host_id")]
    StateShape,
    #[error("empty {0}")]
    EmptyId(&'static str),
    #[error("{0} contains an MQTT wildcard (+ or #) or a /")]
    Wildcard(&'static str),
}

/// Parse a topic name. Topic filters (with wildcards) are refused.
pub fn parse_topic(topic: &str) -> Result<Topic, TopicError> {
    let mut levels = topic.split('/');
    if levels.next() != Some(NAMESPACE) {
        return Err(TopicError::Namespace);
    }
    let rest: Vec<&str> = levels.take(5).collect();
    if rest.first() == Some(&"STATE") {
        return match rest.as_slice() {
            [_, host] => Ok(Topic::HostState {
                host_id: checked_id(host, "host_id")?,
            }),
            _ => Err(TopicError::StateShape),
        };
    }
    let (group, kind, node, device) = match rest.as_slice() {
        [group, kind, node] => (*group, *kind, *node, None),
        [group, kind, node, device] => (*group, *kind, *node, Some(*device)),
        [_, kind, ..] => {
            let message_type = MessageType::from_token(kind)
                .ok_or_else(|| TopicError::UnknownMessageType((*kind).to_owned()))?;
            return Err(shape_error(message_type));
        }
        _ => return Err(TopicError::TooFewLevels),
    };
    let message_type = MessageType::from_token(kind)
        .ok_or_else(|| TopicError::UnknownMessageType(kind.to_owned()))?;
    if message_type == MessageType::State {
        return Err(TopicError::StateShape);
    }
    if message_type.is_device_level() != device.is_some() {
        return Err(shape_error(message_type));
    }
    Ok(Topic::Edge(EdgeTopic {
        group_id: checked_id(group, "group_id")?,
        message_type,
        edge_node_id: checked_id(node, "edge_node_id")?,
        device_id: device.map(|d| checked_id(d, "device_id")).transpose()?,
    }))
}

fn shape_error(message_type: MessageType) -> TopicError {
    if message_type == MessageType::State {
        TopicError::StateShape
    } else if message_type.is_device_level() {
        TopicError::DeviceLevelShape(message_type)
    } else {
        TopicError::NodeLevelShape(message_type)
    }
}

fn checked_id(id: &str, what: &'static str) -> Result<String, TopicError> {
    if id.is_empty() {
        return Err(TopicError::EmptyId(what));
    }
    if id.contains(['+', '#']) {
        return Err(TopicError::Wildcard(what));
    }
    Ok(id.to_owned())
}

/// The topic a host publishes a node command (NCMD) to.
pub fn ncmd_topic(group_id: &str, edge_node_id: &str) -> String {
    format!("{NAMESPACE}/{group_id}/NCMD/{edge_node_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(topic: &str) -> EdgeTopic {
        match parse_topic(topic) {
            Ok(Topic::Edge(e)) => e,
            other => panic!("{topic}: {other:?}"),
        }
    }

    #[test]
    fn node_and_device_topics() {
        let t = edge("spBv1.0/plant1/NBIRTH/gw7");
        assert_eq!(t.group_id, "plant1");
        assert_eq!(t.message_type, MessageType::NBirth);
        assert_eq!(t.edge_node_id, "gw7");
        assert_eq!(t.device_id, None);
        assert_eq!(t.to_string(), "spBv1.0/plant1/NBIRTH/gw7");

        let t = edge("spBv1.0/plant1/DDATA/gw7/pump 3");
        assert_eq!(t.message_type, MessageType::DData);
        assert_eq!(t.device_id.as_deref(), Some("pump 3"));
        assert_eq!(t.to_string(), "spBv1.0/plant1/DDATA/gw7/pump 3");

        for kind in ["NDEATH", "NDATA", "NCMD"] {
            assert!(!edge(&format!("spBv1.0/g/{kind}/n"))
                .message_type
                .is_device_level());
        }
        for kind in ["DBIRTH", "DDEATH", "DCMD"] {
            assert!(edge(&format!("spBv1.0/g/{kind}/n/d"))
                .message_type
                .is_device_level());
        }
    }

    #[test]
    fn host_state_topic() {
        assert_eq!(
            parse_topic("spBv1.0/STATE/scada-1"),
            Ok(Topic::HostState {
                host_id: "scada-1".into()
            })
        );
        assert_eq!(
            parse_topic("spBv1.0/STATE/a/b"),
            Err(TopicError::StateShape)
        );
        assert_eq!(
            parse_topic("spBv1.0/g/STATE/n"),
            Err(TopicError::StateShape)
        );
    }

    #[test]
    fn invalid_topics() {
        use TopicError::*;
        let cases = [
            ("spAv1.0/g/NBIRTH/n", Namespace),
            ("spBv1.0", TooFewLevels),
            ("spBv1.0/g", TooFewLevels),
            ("spBv1.0/g/NBIRTH", NodeLevelShape(MessageType::NBirth)),
            ("spBv1.0/g/HELLO/n", UnknownMessageType("HELLO".into())),
            ("spBv1.0/g/NBIRTH/n/d", NodeLevelShape(MessageType::NBirth)),
            ("spBv1.0/g/DDATA/n", DeviceLevelShape(MessageType::DData)),
            (
                "spBv1.0/g/DDATA/n/d/x",
                DeviceLevelShape(MessageType::DData),
            ),
            ("spBv1.0//NDATA/n", EmptyId("group_id")),
            ("spBv1.0/g/NDATA/", EmptyId("edge_node_id")),
            ("spBv1.0/g/DDATA/n/", EmptyId("device_id")),
            ("spBv1.0/+/NDATA/n", Wildcard("group_id")),
            ("spBv1.0/g/NDATA/#", Wildcard("edge_node_id")),
            ("spBv1.0/STATE/", EmptyId("host_id")),
        ];
        for (topic, err) in cases {
            assert_eq!(parse_topic(topic), Err(err), "{topic}");
        }
    }

    #[test]
    fn ncmd_topic_parses_back() {
        let t = edge(&ncmd_topic("g", "n"));
        assert_eq!(t.message_type, MessageType::NCmd);
    }
}
