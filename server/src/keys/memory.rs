//! The `memory` key manager: keys live only as long as the process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::software::SoftwareKey;
use super::{Kek, KeyError, KeyHandle, KeyManager, KeyType, MacKey, SoftwareKek, SoftwareMac};

/// Keys in process memory; a restart starts a new CA.
#[derive(Debug, Default)]
pub struct MemoryKeyManager {
    keys: Mutex<HashMap<String, Arc<SoftwareKey>>>,
    keks: Mutex<HashMap<String, Arc<SoftwareKek>>>,
    macs: Mutex<HashMap<String, Arc<SoftwareMac>>>,
}

#[async_trait]
impl KeyManager for MemoryKeyManager {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn generate(&self, id: &str, key_type: KeyType) -> Result<Arc<dyn KeyHandle>, KeyError> {
        let id_owned = id.to_string();
        let key = tokio::task::spawn_blocking(move || SoftwareKey::generate(&id_owned, key_type))
            .await
            .map_err(|e| KeyError::Storage(e.to_string()))??;
        let key = Arc::new(key);
        self.keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), key.clone());
        Ok(key)
    }

    async fn get(&self, id: &str) -> Result<Option<Arc<dyn KeyHandle>>, KeyError> {
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        Ok(keys.get(id).map(|k| k.clone() as Arc<dyn KeyHandle>))
    }

    async fn delete(&self, id: &str) -> Result<(), KeyError> {
        self.keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        Ok(())
    }

    async fn kek(&self, id: &str) -> Result<Arc<dyn Kek>, KeyError> {
        let mut keks = self.keks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = keks.get(id) {
            return Ok(k.clone());
        }
        let mut raw = super::aes::generate()?;
        let k = Arc::new(SoftwareKek(std::mem::take(&mut *raw)));
        keks.insert(id.to_string(), k.clone());
        Ok(k)
    }

    async fn mac_key(&self, id: &str) -> Result<Arc<dyn MacKey>, KeyError> {
        let mut macs = self.macs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = macs.get(id) {
            return Ok(k.clone());
        }
        let k = Arc::new(SoftwareMac::new(&super::aes::generate()?));
        macs.insert(id.to_string(), k.clone());
        Ok(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn mac_keys_are_made_once_per_id() {
        let km = MemoryKeyManager::default();
        let tag = km.mac_key("a").await.unwrap().mac(b"row").unwrap();
        assert_eq!(km.mac_key("a").await.unwrap().mac(b"row").unwrap(), tag);
        assert_ne!(km.mac_key("b").await.unwrap().mac(b"row").unwrap(), tag);
    }
}
