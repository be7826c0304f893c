import type { Logger } from '../logging/logger';
import type { AuditLog } from './accounts/auditLog';
import type { FileStore } from './store/fileStore';
import type { LoginThrottle } from './accounts/loginThrottle';
import type { MetadataDb } from './store/metadataDb';

/** What a file-transfer protocol server (SFTP, FTPS) shares with the others: one store, accounts, rules. */
export interface FileProtocolDeps {
  db: MetadataDb;
  store: FileStore;
  maxFileBytes: number;
  log: Logger;
  audit: AuditLog;
  loginThrottle: LoginThrottle;
}
