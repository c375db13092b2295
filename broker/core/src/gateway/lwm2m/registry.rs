//! The LwM2M object registry: object definitions in the OMA registry's XML format, by object
//! id and by name. The gateway types the values devices send with it (a TLV integer and a TLV
//! string look alike) and names objects and resources in what it publishes. The runtime
//! reads the files of `lwm2m.xml_dir`; this module parses their text.
//!
//! A definition is `/LWM2M/Object` with `Name`, `ObjectID`, `ObjectURN`, `MultipleInstances`
//! (`Single` or `Multiple`), `Mandatory` and `Resources/Item[@ID]`, each item with `Name`,
//! `Operations` (`R`, `W`, `RW`, `E` or empty), `MultipleInstances`, `Mandatory`, `Type`,
//! `RangeEnumeration` and `Units`. Everything else (descriptions) is skipped; values are
//! trimmed.

use quick_xml::events::Event;
use quick_xml::Reader;
use shardmq_protocol::lwm2m::{Path, ResourceType};
use std::collections::{BTreeMap, HashMap};
use thiserror::Error;

/// What a resource allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Operations {
    /// Read.
    pub read: bool,
    /// Write.
    pub write: bool,
    /// Execute.
    pub execute: bool,
}

impl Operations {
    fn parse(s: &str) -> Operations {
        let s = s.trim().to_ascii_uppercase();
        Operations {
            read: s.contains('R'),
            write: s.contains('W'),
            execute: s.contains('E'),
        }
    }
}

/// One resource of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceDef {
    /// Its id.
    pub id: u16,
    /// Its name (`Manufacturer`).
    pub name: String,
    /// What it allows.
    pub operations: Operations,
    /// Whether it has instances.
    pub multiple: bool,
    /// Whether a device must have it.
    pub mandatory: bool,
    /// Its data type.
    pub ty: ResourceType,
    /// `RangeEnumeration`, as written.
    pub range: String,
    /// `Units`, as written.
    pub units: String,
}

/// One object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectDef {
    /// Its id (3 for Device).
    pub id: u16,
    /// Its name (`Device`).
    pub name: String,
    /// Its URN (`urn:oma:lwm2m:oma:3`).
    pub urn: String,
    /// Whether a device may have several instances.
    pub multiple: bool,
    /// Whether a device must have it.
    pub mandatory: bool,
    /// Its resources by id.
    pub resources: BTreeMap<u16, ResourceDef>,
}

/// Why a definition did not load.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RegistryError {
    /// Not well-formed XML.
    #[error("not well-formed XML: {0}")]
    Xml(String),
    /// Well-formed, but not an object definition.
    #[error("{0}")]
    Definition(String),
}

/// Object definitions by id and by name.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    by_id: BTreeMap<u16, ObjectDef>,
    by_name: HashMap<String, u16>,
}

impl Registry {
    /// No definitions.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Adds the definition in `xml` (replacing one with the same id); returns its id.
    pub fn load_str(&mut self, xml: &str) -> Result<u16, RegistryError> {
        let def = parse(xml)?;
        let id = def.id;
        if let Some(old) = self.by_id.remove(&id) {
            self.by_name.remove(&old.name);
        }
        self.by_name.insert(def.name.clone(), id);
        self.by_id.insert(id, def);
        Ok(id)
    }

    /// How many objects it defines.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether it defines none.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The object `id`.
    pub fn object(&self, id: u16) -> Option<&ObjectDef> {
        self.by_id.get(&id)
    }

    /// The object named `name`.
    pub fn object_named(&self, name: &str) -> Option<&ObjectDef> {
        self.by_name.get(name).and_then(|id| self.by_id.get(id))
    }

    /// The definition of the resource `path` names (its object and resource ids).
    pub fn resource(&self, path: &Path) -> Option<&ResourceDef> {
        self.by_id
            .get(&path.object_id())?
            .resources
            .get(&path.resource_id()?)
    }

    /// The type of the resource `path` names, if defined.
    pub fn resource_type(&self, path: &Path) -> Option<ResourceType> {
        self.resource(path).map(|r| r.ty)
    }

    /// The ids of every object defined.
    pub fn ids(&self) -> impl Iterator<Item = u16> + '_ {
        self.by_id.keys().copied()
    }
}

/// What the parser has seen so far.
#[derive(Default)]
struct Builder {
    /// The open elements joined with `/`.
    joined: String,
    depth: usize,
    text: String,
    object: Option<ObjectFields>,
    item: Option<ResourceDef>,
    objects: usize,
}

#[derive(Default)]
struct ObjectFields {
    id: Option<u16>,
    name: String,
    urn: String,
    multiple: bool,
    mandatory: bool,
    resources: BTreeMap<u16, ResourceDef>,
}

fn bad(what: impl Into<String>) -> RegistryError {
    RegistryError::Definition(what.into())
}

/// Parses one object definition.
pub fn parse(xml: &str) -> Result<ObjectDef, RegistryError> {
    let mut reader = Reader::from_str(xml);
    let mut b = Builder::default();
    loop {
        match reader.read_event() {
            Err(e) => {
                return Err(RegistryError::Xml(format!(
                    "{e} (at byte {})",
                    reader.buffer_position()
                )))
            }
            Ok(Event::Eof) => break,
            Ok(Event::Start(e)) => {
                let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                if b.depth > 16 {
                    return Err(bad("elements nested too deep"));
                }
                match (b.path(), name.as_str()) {
                    ("LWM2M", "Object") => {
                        b.objects += 1;
                        if b.objects > 1 {
                            return Err(bad("more than one object in a file"));
                        }
                        b.object = Some(ObjectFields::default());
                    }
                    ("LWM2M/Object/Resources", "Item") => {
                        let mut id = None;
                        for a in e.attributes() {
                            let a = a.map_err(|e| RegistryError::Xml(e.to_string()))?;
                            if a.key.local_name().as_ref() == b"ID" {
                                let v = String::from_utf8_lossy(&a.value).into_owned();
                                id = Some(v.trim().parse::<u16>().map_err(|_| {
                                    bad(format!("resource ID {v:?} is not a number up to 65535"))
                                })?);
                            }
                        }
                        b.item = Some(ResourceDef {
                            id: id.ok_or_else(|| bad("a resource Item without ID"))?,
                            name: String::new(),
                            operations: Operations::default(),
                            multiple: false,
                            mandatory: false,
                            ty: ResourceType::None,
                            range: String::new(),
                            units: String::new(),
                        });
                    }
                    _ => {}
                }
                b.push(&name);
                b.text.clear();
            }
            Ok(Event::Empty(_)) => {}
            Ok(Event::Text(t)) => {
                let s = t.decode().map_err(|e| RegistryError::Xml(e.to_string()))?;
                b.text.push_str(&s);
            }
            Ok(Event::GeneralRef(r)) => {
                // `&amp;` and the like, and `&#…;` character references.
                if let Ok(Some(c)) = r.resolve_char_ref() {
                    b.text.push(c);
                } else {
                    let name = r.decode().map_err(|e| RegistryError::Xml(e.to_string()))?;
                    let resolved = quick_xml::escape::resolve_predefined_entity(&name)
                        .ok_or_else(|| RegistryError::Xml(format!("unknown entity &{name};")))?;
                    b.text.push_str(resolved);
                }
            }
            Ok(Event::CData(t)) => b.text.push_str(&String::from_utf8_lossy(&t)),
            Ok(Event::End(_)) => {
                let text = std::mem::take(&mut b.text);
                let value = text.trim();
                let path = b.path().to_string();
                match path.as_str() {
                    "LWM2M/Object/Name" => b.obj()?.name = value.into(),
                    "LWM2M/Object/ObjectID" => {
                        b.obj()?.id = Some(value.parse().map_err(|_| {
                            bad(format!("ObjectID {value:?} is not a number up to 65535"))
                        })?)
                    }
                    "LWM2M/Object/ObjectURN" => b.obj()?.urn = value.into(),
                    "LWM2M/Object/MultipleInstances" => {
                        b.obj()?.multiple = value.eq_ignore_ascii_case("Multiple")
                    }
                    "LWM2M/Object/Mandatory" => {
                        b.obj()?.mandatory = value.eq_ignore_ascii_case("Mandatory")
                    }
                    "LWM2M/Object/Resources/Item" => {
                        let item = b.item.take().ok_or_else(|| bad("stray </Item>"))?;
                        let resources = &mut b.obj()?.resources;
                        if resources.contains_key(&item.id) {
                            return Err(bad(format!("resource {} defined twice", item.id)));
                        }
                        resources.insert(item.id, item);
                    }
                    p if p.starts_with("LWM2M/Object/Resources/Item/") => {
                        let item = b
                            .item
                            .as_mut()
                            .ok_or_else(|| bad("a field outside <Item>"))?;
                        match &p["LWM2M/Object/Resources/Item/".len()..] {
                            "Name" => item.name = value.into(),
                            "Operations" => item.operations = Operations::parse(value),
                            "MultipleInstances" => {
                                item.multiple = value.eq_ignore_ascii_case("Multiple")
                            }
                            "Mandatory" => item.mandatory = value.eq_ignore_ascii_case("Mandatory"),
                            "Type" => {
                                item.ty = ResourceType::parse(value).ok_or_else(|| {
                                    bad(format!("resource {}: unknown Type {value:?}", item.id))
                                })?
                            }
                            "RangeEnumeration" => item.range = value.into(),
                            "Units" => item.units = value.into(),
                            _ => {}
                        }
                    }
                    _ => {}
                }
                b.pop();
            }
            Ok(_) => {}
        }
    }
    let o = b.object.ok_or_else(|| bad("no /LWM2M/Object element"))?;
    let id = o.id.ok_or_else(|| bad("no ObjectID"))?;
    if o.name.is_empty() {
        return Err(bad(format!("object {id} has no Name")));
    }
    Ok(ObjectDef {
        id,
        name: o.name,
        urn: o.urn,
        multiple: o.multiple,
        mandatory: o.mandatory,
        resources: o.resources,
    })
}

impl Builder {
    /// The open elements, `LWM2M/Object/…`.
    fn path(&self) -> &str {
        &self.joined
    }

    fn push(&mut self, name: &str) {
        if !self.joined.is_empty() {
            self.joined.push('/');
        }
        self.joined.push_str(name);
        self.depth += 1;
    }

    fn pop(&mut self) {
        let cut = self.joined.rfind('/').unwrap_or(0);
        self.joined.truncate(cut);
        self.depth = self.depth.saturating_sub(1);
    }

    fn obj(&mut self) -> Result<&mut ObjectFields, RegistryError> {
        self.object
            .as_mut()
            .ok_or_else(|| bad("a field outside <Object>"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> Registry {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/lwm2m_xml");
        let mut r = Registry::new();
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "xml"))
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            r.load_str(&text)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        }
        r
    }

    #[test]
    fn the_shipped_definitions_load() {
        let r = shipped();
        assert_eq!(
            r.ids().collect::<Vec<_>>(),
            [0, 1, 2, 3, 4, 5, 6, 7, 9, 3303, 3304, 3311]
        );
        let device = r.object_named("Device").unwrap();
        assert_eq!(
            (device.id, device.multiple, device.mandatory),
            (3, false, true)
        );
        let m = &device.resources[&0];
        assert_eq!(
            (m.name.as_str(), m.ty),
            ("Manufacturer", ResourceType::String)
        );
        assert!(m.operations.read && !m.operations.write);
        let reboot = &device.resources[&4];
        assert_eq!(
            (reboot.ty, reboot.operations.execute),
            (ResourceType::None, true)
        );
        assert!(device.resources[&6].multiple);
        let path = |s| Path::parse(s).unwrap();
        assert_eq!(r.resource_type(&path("/3/0/13")), Some(ResourceType::Time));
        assert_eq!(
            r.resource_type(&path("/3303/0/5700")),
            Some(ResourceType::Float)
        );
        assert_eq!(r.resource_type(&path("/3303/0/9999")), None);
        assert_eq!(r.resource_type(&path("/3")), None);
        assert_eq!(r.object(3303).unwrap().name, "Temperature");
    }

    #[test]
    fn bad_definitions_say_why() {
        let obj = |inner: &str| {
            format!("<LWM2M><Object><Name>X</Name><ObjectID>77</ObjectID><Resources>{inner}</Resources></Object></LWM2M>")
        };
        let mut r = Registry::new();
        assert_eq!(r.load_str(&obj("")), Ok(77));
        assert!(matches!(
            r.load_str("<LWM2M><Object>"),
            Err(RegistryError::Xml(_)) | Err(RegistryError::Definition(_))
        ));
        assert!(matches!(
            r.load_str("<LWM2M></Object></LWM2M>"),
            Err(RegistryError::Xml(_))
        ));
        for (xml, says) in [
            (
                "<LWM2M><Object><Name>X</Name></Object></LWM2M>".to_string(),
                "no ObjectID",
            ),
            (obj("<Item ID=\"a\"><Name>n</Name></Item>"), "resource ID"),
            (
                obj("<Item ID=\"1\"><Type>Complex</Type></Item>"),
                "unknown Type",
            ),
            (
                obj("<Item ID=\"1\"></Item><Item ID=\"1\"></Item>"),
                "defined twice",
            ),
            (obj("<Item><Name>n</Name></Item>"), "without ID"),
            ("<Other/>".to_string(), "no /LWM2M/Object"),
        ] {
            let e = r.load_str(&xml).unwrap_err().to_string();
            assert!(e.contains(says), "{xml}: {e}");
        }
        // Entities and CDATA are read; a later definition of an id replaces the earlier one.
        let xml = "<LWM2M><Object><Name>A &amp; B</Name><ObjectID>77</ObjectID><Resources><Item ID=\"2\"><Name><![CDATA[Temp]]></Name><Type> Float </Type></Item></Resources></Object></LWM2M>";
        assert_eq!(r.load_str(xml), Ok(77));
        assert_eq!(r.object(77).unwrap().name, "A & B");
        assert!(r.object_named("X").is_none());
        assert_eq!(r.object(77).unwrap().resources[&2].name, "Temp");
        assert_eq!(r.object(77).unwrap().resources[&2].ty, ResourceType::Float);
    }
}
