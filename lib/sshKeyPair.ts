import { utils } from 'ssh2';

/**
 * An ed25519 key pair in OpenSSH format. ssh2's generator sometimes writes a public key one byte
 * short (when its first byte is zero, about 1 in 256), which nothing can parse: such pairs are
 * drawn again.
 */
export function generateEd25519KeyPair(comment = ''): { private: string; public: string } {
  for (;;) {
    const pair = utils.generateKeyPairSync('ed25519', { comment });
    if (!(utils.parseKey(pair.public) instanceof Error) && !(utils.parseKey(pair.private) instanceof Error))
      return pair;
  }
}
