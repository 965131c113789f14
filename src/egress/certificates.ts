/**
 * The per-session certificate authority the egress proxy intercepts TLS with: an ECDSA P-256 CA
 * made when the proxy starts (valid for a few days, only ever trusted by that session's sandbox)
 * and leaf certificates minted on demand per host name, cached. Built with `@peculiar/x509` on
 * Node's WebCrypto; the private keys never leave this process.
 */
import 'reflect-metadata';
import { createPrivateKey, randomBytes, webcrypto } from 'node:crypto';
import { isIP } from 'node:net';
import * as x509 from '@peculiar/x509';

x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);

type CryptoKeyPair = webcrypto.CryptoKeyPair;

const ALGORITHM = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' } as const;
const DAY_MS = 24 * 60 * 60 * 1000;
/** Leaf certificates kept per CA; the oldest is dropped beyond this (each is one host name). */
const LEAF_CACHE_SIZE = 1000;

/** A certificate and its key, in the PEM forms node:tls takes. */
export interface IssuedCertificate {
  certificatePem: string;
  keyPem: string;
}

export interface CertificateAuthority {
  /** The CA certificate (PEM) the sandbox trusts. */
  readonly certificatePem: string;
  /** A certificate for `host` signed by the CA (cached per host). */
  issue(host: string): Promise<IssuedCertificate>;
}

const serial = () =>
  randomBytes(16)
    .toString('hex')
    .replace(/^[89a-f]/, '7');

async function privateKeyPem(key: webcrypto.CryptoKey): Promise<string> {
  const der = Buffer.from(await webcrypto.subtle.exportKey('pkcs8', key));
  return createPrivateKey({ key: der, format: 'der', type: 'pkcs8' })
    .export({ format: 'pem', type: 'pkcs8' })
    .toString();
}

/** Makes a CA named after `label` (e.g. the session id). */
export async function createCertificateAuthority(label: string): Promise<CertificateAuthority> {
  const keys = (await webcrypto.subtle.generateKey(ALGORITHM, true, ['sign', 'verify'])) as CryptoKeyPair;
  const now = Date.now();
  const name = `CN=Berth egress CA ${label.replace(/[,=+<>#;"\\]/g, '_')}, O=Berth`;
  const authority = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: serial(),
    name,
    notBefore: new Date(now - DAY_MS),
    notAfter: new Date(now + 30 * DAY_MS),
    keys,
    signingAlgorithm: ALGORITHM,
    extensions: [
      new x509.BasicConstraintsExtension(true, 0, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
    ],
  });
  const leafCache = new Map<string, Promise<IssuedCertificate>>();
  return {
    certificatePem: authority.toString('pem'),
    issue(host) {
      let issued = leafCache.get(host);
      if (!issued) {
        issued = (async () => {
          const leafKeys = (await webcrypto.subtle.generateKey(ALGORITHM, true, [
            'sign',
            'verify',
          ])) as CryptoKeyPair;
          const isAddress = isIP(host) !== 0;
          const leaf = await x509.X509CertificateGenerator.create({
            serialNumber: serial(),
            subject: `CN=${host.replace(/[,=+<>#;"\\]/g, '_')}`,
            issuer: authority.subject,
            notBefore: new Date(now - DAY_MS),
            notAfter: new Date(now + 29 * DAY_MS),
            publicKey: leafKeys.publicKey,
            signingKey: keys.privateKey,
            signingAlgorithm: ALGORITHM,
            extensions: [
              new x509.BasicConstraintsExtension(false, undefined, true),
              new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
              new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth]),
              new x509.SubjectAlternativeNameExtension([{ type: isAddress ? 'ip' : 'dns', value: host }]),
              await x509.AuthorityKeyIdentifierExtension.create(keys.publicKey),
            ],
          });
          return { certificatePem: leaf.toString('pem'), keyPem: await privateKeyPem(leafKeys.privateKey) };
        })();
        leafCache.set(host, issued);
        issued.catch(() => leafCache.delete(host));
        if (leafCache.size > LEAF_CACHE_SIZE) {
          const oldest = leafCache.keys().next().value;
          if (oldest !== undefined) leafCache.delete(oldest);
        }
      }
      return issued;
    },
  };
}
