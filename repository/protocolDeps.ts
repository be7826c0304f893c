import type { Logger } from '../logging/logger';
import type { AuditLog } from './accounts/auditLog';
import type { FileStore } from './store/fileStore';
import type { LoginThrottle } from './accounts/loginThrottle';
import type { MetadataStore } from './store/metadataStore';

/** What a file-transfer protocol server (SFTP, FTPS) shares with the others: one store, accounts, rules. */
export interface FileProtocolDeps {
  db: MetadataStore;
  store: FileStore;
  maxFileBytes: number;
  log: Logger;
  audit: AuditLog;
  loginThrottle: LoginThrottle;
}
