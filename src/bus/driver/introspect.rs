//! The driver's introspection data, written from the method table, so that it lists exactly
//! what the driver serves.

use std::fmt::Write;

use super::messages::DRIVER_PATH;
use super::method::{Interface, Method};

/// The introspection data for a path: the driver's `interfaces` at its own path and at `/`, and
/// the nodes that lead to it.
pub(super) fn render(interfaces: &[Interface], path: &str) -> String {
    let mut xml = String::from(
        "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n\
         \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n<node>\n",
    );
    if path == DRIVER_PATH || path == "/" {
        for interface in interfaces {
            write_interface(&mut xml, interface);
        }
    }
    let below = if path == "/" {
        DRIVER_PATH.strip_prefix('/')
    } else {
        DRIVER_PATH
            .strip_prefix(path)
            .and_then(|r| r.strip_prefix('/'))
    };
    if let Some(child) = below
        .and_then(|rest| rest.split('/').next())
        .filter(|c| !c.is_empty())
    {
        // Writing to a String cannot fail.
        let _ = writeln!(xml, "  <node name=\"{child}\"/>");
    }
    xml.push_str("</node>\n");
    xml
}

fn write_interface(xml: &mut String, interface: &Interface) {
    let _ = writeln!(xml, "  <interface name=\"{}\">", interface.name);
    for method in interface.methods {
        write_method(xml, method);
    }
    xml.push_str(interface.emits);
    xml.push_str("  </interface>\n");
}

fn write_method(xml: &mut String, method: &Method) {
    if method.args_in.is_empty() && method.args_out.is_empty() {
        let _ = writeln!(xml, "    <method name=\"{}\"/>", method.name);
        return;
    }
    let _ = write!(xml, "    <method name=\"{}\">", method.name);
    let args_in = method.args_in.iter().map(|t| ("in", t));
    for (direction, signature) in args_in.chain(method.args_out.iter().map(|t| ("out", t))) {
        let _ = write!(xml, "<arg direction=\"{direction}\" type=\"{signature}\"/>");
    }
    xml.push_str("</method>\n");
}
