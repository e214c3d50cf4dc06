//! The token: its PKCS#11 context, a pool of logged-in sessions, lookups by label, and the
//! session-object copies private keys sign through.

use std::collections::HashMap;
use std::sync::Mutex;

use cryptoki::context::Pkcs11;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::Slot;

use super::{LABEL_PREFIX, ck};
use crate::keys::KeyError;

/// The token, its login and a pool of sessions; shared by every key handle.
pub(super) struct Token {
    /// Always Some until drop, which finalizes the module.
    pub(super) ctx: Option<Pkcs11>,
    pub(super) slot: Slot,
    /// Open sessions, each logged in (the login is per token). Sessions are only closed on
    /// drop, so the session objects created through them live as long as the token.
    pub(super) pool: Mutex<Vec<Session>>,
    /// Session-object copies of private keys, by key id: (token object copied, its copy).
    pub(super) copies: Mutex<HashMap<String, (ObjectHandle, ObjectHandle)>>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        // Sessions close first (taking the session objects with them); then the library is
        // finalized, as PKCS#11 asks of every application.
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).clear();
        if let Some(ctx) = self.ctx.take()
            && let Err(e) = ctx.finalize()
        {
            tracing::warn!(error = %e, "PKCS#11 finalize failed");
        }
    }
}

impl Token {
    pub(super) fn ctx(&self) -> Result<&Pkcs11, KeyError> {
        self.ctx
            .as_ref()
            .ok_or_else(|| KeyError::Pkcs11("module already finalized".into()))
    }

    /// Runs `f` with a pooled (or newly opened) logged-in session.
    pub(super) fn with_session<T>(
        &self,
        f: impl FnOnce(&Session) -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        let pooled = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let session = match pooled {
            Some(s) => s,
            None => self
                .ctx()?
                .open_rw_session(self.slot)
                .map_err(ck("open session"))?,
        };
        let out = f(&session);
        self.pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(session);
        out
    }

    /// The token object (not a session copy) of `class` labelled for `id`.
    pub(super) fn find(
        &self,
        s: &Session,
        id: &str,
        class: ObjectClass,
    ) -> Result<Option<ObjectHandle>, KeyError> {
        self.find_labelled(s, id, class, Some(Attribute::Token(true)))
    }

    /// Any object (token object or session copy) of `class` labelled for `id`.
    pub(super) fn find_any(
        &self,
        s: &Session,
        id: &str,
        class: ObjectClass,
    ) -> Result<Option<ObjectHandle>, KeyError> {
        self.find_labelled(s, id, class, None)
    }

    /// The first object of `class` labelled for `id` (and matching `extra`, if given).
    fn find_labelled(
        &self,
        s: &Session,
        id: &str,
        class: ObjectClass,
        extra: Option<Attribute>,
    ) -> Result<Option<ObjectHandle>, KeyError> {
        let label = format!("{LABEL_PREFIX}{id}");
        let mut template = vec![
            Attribute::Class(class),
            Attribute::Label(label.into_bytes()),
        ];
        template.extend(extra);
        let found = s.find_objects(&template).map_err(ck("find object"))?;
        Ok(found.into_iter().next())
    }

    /// The handle to sign with for the private key `id` (token object `private`): its
    /// session-object copy, made once per token object (a key generated again under the same
    /// id gets a fresh copy, and the stale one is destroyed); the token object itself if the
    /// token refuses a copy.
    pub(super) fn signing_handle(
        &self,
        s: &Session,
        id: &str,
        private: ObjectHandle,
    ) -> ObjectHandle {
        let mut copies = self.copies.lock().unwrap_or_else(|e| e.into_inner());
        match copies.get(id) {
            Some((of, copy)) if *of == private => return *copy,
            Some((_, stale)) => {
                if let Err(e) = s.destroy_object(*stale) {
                    tracing::debug!(key = id, error = %e, "destroying a stale session copy");
                }
                copies.remove(id);
            }
            None => {}
        }
        match s.copy_object(private, &[Attribute::Token(false)]) {
            Ok(h) => {
                copies.insert(id.to_string(), (private, h));
                h
            }
            Err(e) => {
                tracing::debug!(key = id, error = %e, "no session copy of the key; signing with the token object");
                private
            }
        }
    }

    /// Forgets the session copy of `id` (its object is destroyed by the caller).
    pub(super) fn forget_copy(&self, id: &str) {
        self.copies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }
}
